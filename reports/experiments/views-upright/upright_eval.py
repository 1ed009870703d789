"""`views: upright` on the default bundle's INT8 graphs: each ELPV frame of a split turned by
one, two and three quarter turns, judged as it comes (views: one) and turned upright first
(views: upright); verdict agreement with the unturned frame and binary accuracy. Then each
views setting on the unturned frames as the line sees them (bundle thresholds: flags, escapes;
escapes at <= 25 % flagged along the p_defect curve). Also: how many cells of the whole data
set turn_upright would turn, and its cost per frame.

    .venv/bin/python reports/experiments/views-upright/upright_eval.py val   # -> val.json
    .venv/bin/python reports/experiments/views-upright/upright_eval.py plot  # -> escapes.png
    .venv/bin/python reports/experiments/views-upright/upright_eval.py val BUNDLE OUT_DIR   # another bundle
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from appliance.scoring.onnx_backend import OnnxBackend          # noqa: E402
from export import verify                                       # noqa: E402
from export.decide_stats import catalog_defective, catalog_outputs  # noqa: E402
from export.evaluate_bundle import escape_curve, operator_metrics   # noqa: E402
from models.catalog import load_catalog                         # noqa: E402
from models.preprocess import VIEWS, PreprocessSpec, TextTokenizer, turn_upright, upright_quarter_turns  # noqa: E402
from training.data import elpv                                  # noqa: E402
from training.metrics import elpv_metrics, eval_sets            # noqa: E402

BUNDLE = ROOT / "models" / "bundles" / "el-solar-default"


def main(split: str, bundle: Path = BUNDLE) -> dict:
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = PreprocessSpec.from_dict(manifest["preprocessing"])
    tokenizer, catalog = TextTokenizer(bundle / "tokenizer.json", spec.max_tokens), load_catalog(bundle / "catalog.yaml")
    backend = OnnxBackend(bundle, int8=True)
    data, _ = eval_sets(split, spec.image_size)
    defective = catalog_defective(catalog)

    def judge(images):
        rewards = verify.backend_scores(backend, tokenizer, spec, np.stack(images), catalog.displays)
        return rewards, rewards.argmax(1)

    base, base_top = judge(list(data.images))
    out = {"bundle_version": manifest["version"], "split": split, "frames": len(data),
           "binary_unturned": elpv_metrics(base, data)[0]["elpv_binary_accuracy"], "turns": {}}
    for k in (1, 2, 3):
        turned = [np.rot90(g, k) for g in data.images]
        for views, images in (("one", turned), ("upright", [turn_upright(g) for g in turned])):
            rewards, top = judge(images)
            out["turns"][f"{k}_{views}"] = {
                "quarter_turns": k, "views": views,
                "verdict_agreement": float((defective[top] == defective[base_top]).mean()),
                "top1_agreement": float((top == base_top).mean()),
                "elpv_binary_accuracy": elpv_metrics(rewards, data)[0]["elpv_binary_accuracy"]}
            print(k, views, out["turns"][f"{k}_{views}"], flush=True)
    _, _, blank = catalog_outputs(backend, tokenizer, spec, data.images[:1], catalog)
    out["views"] = {}
    for name, views in VIEWS.items():
        outputs = [verify.backend_outputs(backend, tokenizer, spec, np.stack([view(g) for g in data.images]),
                                          catalog.displays) for view in views]
        patches, rewards = outputs[0][0], np.mean([r for _, r in outputs], axis=0)
        curve = escape_curve(manifest, catalog, patches, rewards, blank, data.levels, views=name)
        m = elpv_metrics(rewards, data)[0]
        out["views"][name] = {"elpv_binary_accuracy": m["elpv_binary_accuracy"],
                              "elpv_level_accuracy": m["elpv_level_accuracy"],
                              **operator_metrics(manifest, catalog, patches, rewards, blank, data.levels, views=name),
                              "escapes_at_most_25pct_flagged": min([p["defective_escape_rate"] for p in curve["points"]
                                                                    if p["flag_rate"] <= 0.25], default=None),
                              "escape_curve": curve["points"]}
        print(name, {k: v for k, v in out["views"][name].items() if k != "escape_curve"}, flush=True)
    cells = elpv.read_cells()
    images = elpv.load_images(cells, spec.image_size)
    out["cells_turned_of_all"] = [c.id for c, g in zip(cells, images) if upright_quarter_turns(g)]
    out["cells_all"] = len(cells)
    started = time.perf_counter()
    for g in images[:500]:
        turn_upright(g)
    out["turn_upright_ms_per_frame"] = (time.perf_counter() - started) * 1000 / 500
    return out


def plot(folder: Path) -> Path:
    """escapes.png: escapes against flags for each views setting, val and test side by side."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, split in zip(axes, ("val", "test")):
        result = json.loads((folder / f"{split}.json").read_text())
        for name, m in result["views"].items():
            points = m["escape_curve"]
            line, = ax.plot([100 * q["flag_rate"] for q in points], [100 * q["defective_escape_rate"] for q in points],
                            marker=".", label=name)
            ax.plot([100 * m["flag_rate"]], [100 * m["defective_escape_rate"]], "o", color=line.get_color(), markersize=9)
        ax.axhline(5, color="grey", linestyle=":")
        ax.axvline(25, color="grey", linestyle="--")
        ax.set_title(f"bundle v{result['bundle_version']}, {split} ({result['frames']} cells); dots: bundle thresholds")
        ax.set_xlabel("parts flagged for review (%)")
        ax.set_xlim(0, 60)
    axes[0].set_ylabel("defective cells escaping (%)")
    axes[0].legend(title="views")
    fig.tight_layout()
    fig.savefig(folder / "escapes.png", dpi=110)
    return folder / "escapes.png"


if __name__ == "__main__":
    if sys.argv[1:] == ["plot"]:
        print(plot(Path(__file__).parent))
        sys.exit()
    split = sys.argv[1] if len(sys.argv) > 1 else "val"
    bundle, out = (Path(sys.argv[2]), Path(sys.argv[3])) if len(sys.argv) > 3 else (BUNDLE, Path(__file__).parent)
    result = main(split, bundle)
    (out / f"{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    print({k: v for k, v in result.items() if k != "turns"})
