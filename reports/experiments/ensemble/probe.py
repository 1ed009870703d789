"""Would a two-model ensemble help? (issue 18: the latency budget allows "a two-model ensemble")

Scores val and test with each bundle's INT8 graphs at a station's `views` setting, then the
mean of two bundles' rewards against the catalog (one catalog, the same entries). For each:
ELPV binary (softmax mass of the defect entries >= 0.5, as `linejudge eval`), 4-level, the AUC
of p_defect for "really defective" over all cells, and escapes when flagging called-defect-free
cells by p_defect within a flag budget (threshold chosen on val, applied to test; the flags the
other reasons raise are left out, so this is the p_defect part of the operator's curve).

    .venv/bin/python reports/experiments/ensemble/probe.py upright2 models/bundles/el-solar-default /tmp/v3r-eval /tmp/v4-eval
"""
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from export.evaluate_bundle import bundle_catalog_rewards
from models.catalog import load_catalog

BUDGETS = (0.15, 0.20, 0.25)


def rewards_of(bundle: Path, views: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    rewards, data = bundle_catalog_rewards(bundle, split, views)
    return rewards, np.asarray(data.levels)


def figures(rewards: dict, levels: dict, catalog) -> dict:
    level = np.array([round(e.facts["level"] * 3) for e in catalog.entries])
    defective = np.array(catalog.defective, bool)
    out, thresholds = {}, {}
    for split in ("val", "test"):
        p = np.exp(rewards[split] - rewards[split].max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p_def, truth = p[:, defective].sum(1), levels[split] >= 2
        called_ok = p_def < 0.5
        auc = (p_def[truth][:, None] > p_def[~truth][None]).mean()
        out[f"{split}_binary"] = float(((p_def >= 0.5) == truth).mean())
        out[f"{split}_level"] = float((level[rewards[split].argmax(1)] == levels[split]).mean())
        out[f"{split}_auc"] = float(auc)
        for b in BUDGETS:
            if split == "val":
                thresholds[b] = _threshold(p_def, called_ok, truth, b)
            flagged = called_ok & (p_def >= thresholds[b])
            out[f"{split}_flagged@{b}"] = float(flagged.mean())
            out[f"{split}_escapes@{b}"] = float((truth & called_ok & ~flagged).sum() / truth.sum())
    return out


def _threshold(p_def, called_ok, truth, budget: float) -> float:
    """The lowest p_defect threshold (most escapes caught) whose flags stay within the budget."""
    candidates = np.sort(p_def[called_ok])[::-1]
    allowed = int(budget * len(p_def))
    return float(candidates[min(allowed, len(candidates)) - 1]) if allowed else 1.0


def main(views: str, bundles: list[Path]) -> None:
    catalog = load_catalog(bundles[0] / "catalog.yaml")
    scored = {b: {s: rewards_of(b, views, s) for s in ("val", "test")} for b in bundles}
    levels = {s: scored[bundles[0]][s][1] for s in ("val", "test")}
    rows = {}
    for k in (1, 2, 3):
        for combo in itertools.combinations(bundles, k):
            mean = {s: np.mean([scored[b][s][0] for b in combo], 0) for s in ("val", "test")}
            rows[" + ".join(b.name for b in combo)] = figures(mean, levels, catalog)
    cols = ["val_binary", "test_binary", "val_level", "test_level", "val_auc", "test_auc",
            "test_flagged@0.25", "test_escapes@0.25", "test_escapes@0.15"]
    print("| models | " + " | ".join(cols) + " |\n" + "|---" * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |")
    Path(__file__).with_name(f"probe_{views}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], [Path(p) for p in sys.argv[2:]])
