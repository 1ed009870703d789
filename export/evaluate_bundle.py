"""`linejudge eval --model <bundle>`: the exported graphs on the fixed ELPV split, INT8 beside fp32.

What the appliance runs is judged with the same metrics as the torch model, computed by the
same code (`training/metrics.py`): ELPV binary and 4-level accuracy, pairwise accuracy on ELPV
and synthetic candidate sets, the image-reliance checks (frames swapped between items, a blank
frame), per-fact synthetic accuracy and seen vs held-out phrasings — once with the INT8 graphs
and once with the fp32 ones (`precision="both"`, the default), so the cost of quantization on
the *test* split is a number anyone can rerun (the export gate only sees val). The flat keys
are the INT8 graphs' (or, with one precision, that precision's); `fp32_*` are the twins,
`int8_drop_points_*` the drops, and `int8_vs_fp32` how often the two agree. The flat keys also
report what the line sees with the bundle's own flag thresholds (`operator_metrics`), and
`platform` where the figures were measured, and `robustness` (export/robustness.py) camera
variations, frames with no part in view and outside phrasings, for the flat precision.
`views` judges each ELPV frame as an appliance with that `views` setting does (rewards averaged
over the views): the ELPV, operator, escape-curve and robustness figures; the synthetic and
phrasing candidate sets name locations, which a turned view would swap, so they are always
judged on the frame as it is. No torch import.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from appliance import decide
from models.catalog import load_catalog
from models.errors import ConfigError
from models.preprocess import VIEWS, PreprocessSpec, TextTokenizer, normalize
from appliance.scoring.onnx_backend import OnnxBackend
from export import verify
from export.decide_stats import catalog_defective, catalog_outputs, flag_outcomes
from export.robustness import robustness_metrics
from models.platform import platform_record
from training.data.batches import elpv_set
from training.metrics import check_limit, elpv_metrics, eval_sets, set_metrics

HEADLINE = ("elpv_binary_accuracy", "elpv_level_accuracy", "elpv_pairwise_accuracy",
            "synthetic_pairwise_accuracy", "pairwise_accuracy", "image_swap_accuracy",
            "heldout_phrasing_accuracy")
OPERATOR_KEYS = ("flag_rate", "unflagged_binary_accuracy", "defective_missed_rate", "defective_escape_rate",
                 "functional_false_alarm_rate")
PRECISIONS = ("both", "int8", "fp32")


def evaluate_bundle(bundle: Path, split: str, limit: int | None = None, seed: int = 0,
                    precision: str = "both", views: str = "one") -> dict:
    """Metrics of the INT8 graphs (flat keys) plus `fp32_*` twins, the INT8 drop in points and
    `int8_vs_fp32` agreement; precision "int8" or "fp32" evaluates those graphs alone (flat keys)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if views not in VIEWS:
        raise ConfigError(f"views must be one of {', '.join(VIEWS)} (as the appliance's config), got {views!r}")
    check_limit(limit)
    bundle = Path(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = PreprocessSpec.from_dict(manifest["preprocessing"])
    tokenizer = TextTokenizer(bundle / "tokenizer.json", spec.max_tokens)
    data, syn = eval_sets(split, spec.image_size, limit, seed)
    catalog = load_catalog(bundle / "catalog.yaml")
    metrics = {"model": str(bundle), "model_version": manifest["version"], "split": split,
               "precision": "int8" if precision == "both" else precision, "views": views}
    runs = (("", True), ("fp32_", False)) if precision == "both" else (("", precision == "int8"),)
    outputs = {}
    for prefix, int8 in runs:
        backend = OnnxBackend(bundle, int8=int8)
        patches, rewards, blank = catalog_outputs(backend, tokenizer, spec, data.images, catalog, views)
        m, ordered = elpv_metrics(rewards, data)
        if not prefix:
            m.update(operator_metrics(manifest, catalog, patches, rewards, blank, data.levels, views=views))
            m["escape_curve"] = escape_curve(manifest, catalog, patches, rewards, blank, data.levels, views=views)
            m["robustness"] = robustness_metrics(backend, tokenizer, spec, data, catalog, manifest, rewards, blank,
                                                 m["elpv_binary_accuracy"], views)
            metrics["platform"] = platform_record(backend.provider)
        known = {id(data): patches} if views == "one" else {}     # the sets see the frame as it is
        scorer = backend_set_scorer(backend, tokenizer, spec, seed, known=known)
        sets, syn_r = set_metrics(scorer, syn, data, ordered)
        m.update(sets)
        m["quantized_graphs"] = bool(backend.quantized)
        outputs[prefix] = (rewards, syn_r)
        metrics.update({f"{prefix}{k}": v for k, v in m.items()})
    if precision == "both":
        for key in HEADLINE:
            metrics[f"int8_drop_points_{key}"] = 100 * (metrics[f"fp32_{key}"] - metrics[key])
        metrics["int8_vs_fp32"] = int8_vs_fp32(outputs[""], outputs["fp32_"], metrics)
    return metrics


def bundle_catalog_rewards(bundle: Path, split: str, views: str = "one", int8: bool = True,
                           limit: int | None = None) -> tuple[np.ndarray, object]:
    """(N, K) rewards of a bundle's graphs against its catalog for each ELPV frame of `split` (the
    cells evaluate_bundle scores; "train" too), judged as a station with that `views` setting
    judges, and the ELPV set: for scripts that compare bundles frame by frame (reports/experiments)."""
    bundle = Path(bundle)
    spec = PreprocessSpec.from_dict(json.loads((bundle / "manifest.json").read_text())["preprocessing"])
    data = elpv_set(split, spec.image_size, limit)     # no synthetic sets: they are not scored here
    _, rewards, _ = catalog_outputs(OnnxBackend(bundle, int8=int8), TextTokenizer(bundle / "tokenizer.json", spec.max_tokens),
                                    spec, data.images, load_catalog(bundle / "catalog.yaml"), views)
    return rewards, data


def int8_vs_fp32(int8: tuple, fp32: tuple, metrics: dict) -> dict:
    """How often the INT8 graphs pick what the fp32 ones pick: top-1 over the catalog on the ELPV
    frames (the verdict) and over each synthetic candidate set, reward deltas, pairwise accuracy
    of both."""
    (el8, syn8), (el32, syn32) = int8, fp32
    catalog = verify.agreement(el8, el32)
    return {"top1_agreement": catalog["top1_agreement"],
            "synthetic_top1_agreement": float((syn8.argmax(1) == syn32.argmax(1)).mean()),
            "max_abs_reward_delta": catalog["max_abs_reward_delta"],
            "mean_abs_reward_delta": catalog["mean_abs_reward_delta"],
            "pairwise_int8": metrics["pairwise_accuracy"], "pairwise_fp32": metrics["fp32_pairwise_accuracy"]}


def backend_set_scorer(backend, tokenizer: TextTokenizer, spec: PreprocessSpec, seed: int,
                       known: dict | None = None, batch: int = 64):
    """score_sets for training.metrics through a ScoringBackend: (N, C) rewards, right candidate
    first, the texts drawn as the torch eval draws them. Each set's frames are encoded once
    (`known` maps id(data) to patches already computed) and reused for the swapped run."""
    cache = dict(known or {})
    gray = np.full((1, spec.image_size, spec.image_size), 128, np.uint8)   # as models.preprocess.blank_input
    blank_patches = backend.image_features(normalize(gray, spec))

    def patches_of(data) -> np.ndarray:
        if id(data) not in cache:
            cache[id(data)] = np.concatenate([backend.image_features(normalize(data.images[i:i + batch], spec))
                                              for i in range(0, len(data), batch)])
        return cache[id(data)]

    def score(data, heldout=False, swap=False, blank=False) -> np.ndarray:
        rng = np.random.default_rng(seed)
        texts = [data.texts(i, rng, heldout=heldout) for i in range(len(data))]
        patches = None if blank else patches_of(data)
        if swap:
            patches = np.roll(patches, 1, axis=0)
        rows = []
        for i in range(0, len(data), batch):
            chunk = texts[i:i + batch]
            features = backend.text_features(*tokenizer.encode([t for s in chunk for t in s]))
            features = features.reshape(len(chunk), len(chunk[0]), *features.shape[1:])
            for j, f in enumerate(features):
                frame = blank_patches if blank else patches[i + j:i + j + 1]
                rows.append(backend.rewards(frame, f)[0])
        return np.stack(rows)
    return score


def operator_metrics(manifest: dict, catalog, patches, rewards, blank, levels, *, views: str = "one",
                     flag_budget: float | None = None, **overrides) -> dict:
    """The line's view with the bundle's flag thresholds (overrides as on the appliance): the
    share of frames flagged for review, the binary accuracy of the verdicts that are not, and
    the defective cells that pass unflagged with a defect-free verdict (escapes) — the
    number a quality engineer cares about. The verdict is the top catalog entry, as on the
    appliance (elpv_binary_accuracy sums p over the defective entries instead); the thresholds
    are the bundle's for a station with this `views` setting (and `flag_budget`), as the appliance
    picks them."""
    thresholds = decide.Thresholds.from_manifest(decide.manifest_thresholds(manifest, views, flag_budget),
                                                 **overrides)
    defective = catalog_defective(catalog)
    flagged = np.array([decide.decide(catalog.displays, r, blank, p, thresholds, manifest["ood"], list(defective)).flagged
                        for r, p in zip(rewards, patches)])
    return flag_outcomes(defective[rewards.argmax(1)], np.asarray(levels) >= 2, flagged)


def escape_curve(manifest: dict, catalog, patches, rewards, blank, levels, *, steps: int = 49,
                 views: str = "one") -> dict:
    """Defective cells escaping against the share of parts flagged, as the possible-defect
    threshold `p_defect` sweeps from 0.02 to 0.98 (the other thresholds as in the bundle), and
    the bundle's own point: the trade a quality engineer moves along with `thresholds: {p_defect: ...}`."""
    points = []
    for p in np.linspace(0.02, 0.98, steps):
        outcome = operator_metrics(manifest, catalog, patches, rewards, blank, levels, views=views, p_defect=float(p))
        points.append({"p_defect": round(float(p), 4), "flag_rate": outcome["flag_rate"],
                       "defective_escape_rate": outcome["defective_escape_rate"]})
    chosen = operator_metrics(manifest, catalog, patches, rewards, blank, levels, views=views)
    return {"points": points, "budgets": budget_points(manifest, catalog, patches, rewards, blank, levels, views),
            "chosen": {"p_defect": decide.manifest_thresholds(manifest, views).get("p_defect"),
                       "flag_rate": chosen["flag_rate"], "defective_escape_rate": chosen["defective_escape_rate"]}}


def budget_points(manifest: dict, catalog, patches, rewards, blank, levels, views: str) -> list[dict]:
    """What each flag budget's thresholds (chosen on val at export, `flag_budget` in the appliance
    config) do on these frames; [] for a bundle exported before flag budgets."""
    budgets = decide.manifest_thresholds(manifest, views).get("budgets") or {}
    points = []
    for key in sorted(budgets):
        outcome = operator_metrics(manifest, catalog, patches, rewards, blank, levels, views=views,
                                   flag_budget=float(key))
        points.append({"flag_budget": float(key), **{k: budgets[key][k] for k in ("p_best", "p_defect")},
                       "flag_rate": outcome["flag_rate"], "defective_escape_rate": outcome["defective_escape_rate"]})
    return points


def plot_escape_curve(curve: dict, path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    flags = [100 * p["flag_rate"] for p in curve["points"]]
    escapes = [100 * p["defective_escape_rate"] for p in curve["points"]]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(flags, escapes, marker=".", label="p_defect from 0.02 to 0.98 (p_best as the bundle's)")
    if curve.get("budgets"):
        ax.plot([100 * p["flag_rate"] for p in curve["budgets"]], [100 * p["defective_escape_rate"] for p in curve["budgets"]],
                marker="s", color="darkgreen", label="flag_budget 0.10-0.40 (p_best, p_defect chosen on val)")
    chosen = curve["chosen"]
    ax.plot([100 * chosen["flag_rate"]], [100 * chosen["defective_escape_rate"]], "o", color="crimson",
            markersize=9, label=f"this bundle (p_defect {chosen['p_defect']})")
    ax.axhline(5, color="grey", linestyle=":", label="5 % escapes")
    ax.axvline(25, color="grey", linestyle="--", label="25 % flagged")
    ax.set_xlabel("parts flagged for review (%)")
    ax.set_ylabel("defective cells escaping (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def evaluate_bundle_cli(args) -> int:
    """`linejudge eval --model <bundle>`: metrics JSON, headline figures printed."""
    out, precision = Path(args.json), getattr(args, "precision", None) or "both"
    views = getattr(args, "views", None) or "one"
    metrics = evaluate_bundle(Path(args.model), args.split, args.limit, precision=precision, views=views)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    flat = metrics["precision"]
    for k in HEADLINE:
        if precision == "both":
            print(f"{k:28s} int8 {metrics[k]:.4f}  fp32 {metrics['fp32_' + k]:.4f}  "
                  f"drop {metrics['int8_drop_points_' + k]:+.2f} points")
        else:
            print(f"{k:28s} {flat} {metrics[k]:.4f}")
    if precision == "both":
        agree = metrics["int8_vs_fp32"]
        print(f"{'int8_vs_fp32 top1_agreement':28s} {agree['top1_agreement']:.4f} (catalog), "
              f"{agree['synthetic_top1_agreement']:.4f} (synthetic sets)")
    for k in OPERATOR_KEYS:
        print(f"{k:28s} {flat} {metrics[k]:.4f}" if metrics[k] is not None else f"{k:28s} {flat} -")
    for point in metrics["escape_curve"]["budgets"]:
        print(f"{'flag_budget ' + format(point['flag_budget'], '.2f'):28s} {flat} flagged {point['flag_rate']:.4f}, "
              f"escapes {point['defective_escape_rate']:.4f}")
    print_robustness(metrics["robustness"], flat)
    plot = plot_escape_curve(metrics["escape_curve"], out.with_name(out.stem + "_escapes.png"),
                             f"bundle v{metrics['model_version']} on {metrics['split']} ({flat} graphs, "
                             f"views {views})")
    print(f"metrics -> {out}\nescapes against flags -> {plot}")
    return 0


def print_robustness(robust: dict, precision: str) -> None:
    for name, m in robust["camera_variations"].items():
        print(f"{'camera ' + name:28s} {precision} verdict agreement {m['verdict_agreement']:.4f}, "
              f"binary {m['elpv_binary_accuracy']:.4f}")
    unflagged = [name for name, m in robust["no_part_in_view"].items() if not m["flagged"]]
    print(f"{'no part in view':28s} {precision} {len(robust['no_part_in_view']) - len(unflagged)} of "
          f"{len(robust['no_part_in_view'])} flagged{' (NOT: ' + ', '.join(unflagged) + ')' if unflagged else ''}")
    for key, name in (("outside_phrasings", "outside phrasings binary"),
                      ("outside_phrasings_unseen", "unseen phrasings binary")):
        outside = robust[key]
        print(f"{name:28s} {precision} {outside['elpv_binary_accuracy']:.4f} "
              f"({outside['gap_points']:+.1f} points below the catalog's)")
