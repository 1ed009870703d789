"""How well a bundle's flag score ranks the missed defective cells (issue 18, escapes).

Among the test cells the bundle calls defect-free (top catalog entry), the AUC of each candidate
flag score for "really defective" (level >= 2/3): p_defect (the softmax mass of the defect
entries: what the possible-defect flag reads), P(level >= 1/3) and the expected level. Then, for
each flag budget, the score's threshold chosen on val (fewest escapes within the budget, flags
only on called-defect-free cells) and what it does on test.

    .venv/bin/python reports/experiments/flag-budgets/ranking.py models/bundles/el-solar-default upright2
"""
import sys
from pathlib import Path

import numpy as np

from export.evaluate_bundle import bundle_catalog_rewards
from models.catalog import load_catalog
from training.evaluate import defect_auc


def outputs(bundle: Path, views: str, split: str):
    rewards, data = bundle_catalog_rewards(bundle, split, views)
    p = np.exp(rewards - rewards.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True), rewards.argmax(1), np.asarray(data.levels) >= 2


def main(bundle: Path, views: str) -> None:
    catalog = load_catalog(bundle / "catalog.yaml")
    level = np.array([round(e.facts["level"] * 3) for e in catalog.entries])
    defective = np.array(catalog.defective, bool)
    scores = {"p_defect": lambda p: p[:, defective].sum(1), "P(level >= 1/3)": lambda p: p[:, level >= 1].sum(1),
              "expected level": lambda p: (p * level).sum(1)}
    split = {s: outputs(bundle, views, s) for s in ("val", "test")}
    for name, score in scores.items():
        p, top, truth = split["test"]
        called_ok = ~defective[top]
        s, y = score(p)[called_ok], truth[called_ok]
        auc = defect_auc(s, y)
        rows = []
        for budget in (0.15, 0.20, 0.25, 0.30):
            t = _threshold(score, *split["val"], defective, budget)
            flagged = ~defective[top] & (score(p) >= t)
            escapes = (truth & ~defective[top] & ~flagged).sum() / truth.sum()
            rows.append(f"{budget:.2f}: {flagged.mean():.3f} flagged, {escapes:.3f} escape")
        print(f"{name:16s} AUC {auc:.3f} ({y.sum()} missed of {truth.sum()} defective) | " + " | ".join(rows))


def _threshold(score, p, top, truth, defective, budget: float) -> float:
    s, called_ok = score(p), ~defective[top]
    best = None
    for t in np.unique(s[called_ok]):
        flagged = called_ok & (s >= t)
        if flagged.mean() <= budget:
            key = ((truth & called_ok & ~flagged).sum(), flagged.sum())
            best = min(best, (key, t)) if best else (key, t)
    return best[1]


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "one")
