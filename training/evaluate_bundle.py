"""`linejudge eval --model <bundle>`: the exported graphs on the fixed ELPV split, INT8 beside fp32.

What the appliance runs is judged with the same metrics as the torch model (ELPV binary and
4-level accuracy, pairwise accuracy on ELPV and synthetic candidate sets), once with the fp32
graphs and once with the INT8 ones, so the cost of quantization on the *test* split is a
number anyone can rerun (the export gate only sees val). The INT8 run also reports what the
line sees with the bundle's own flag thresholds (`operator_metrics`).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from appliance import decide
from appliance.candidates import load_catalog
from appliance.preprocess import PreprocessSpec, TextTokenizer
from appliance.scoring.onnx_backend import OnnxBackend
from export import verify
from export.decide_stats import catalog_defective, catalog_outputs, flag_outcomes
from training.data.batches import elpv_set, synthetic_set
from training.evaluate import SYNTHETIC_EVAL_SEED, elpv_metrics, pair_correct

HEADLINE = ("elpv_binary_accuracy", "elpv_level_accuracy", "elpv_pairwise_accuracy",
            "synthetic_pairwise_accuracy", "pairwise_accuracy")
OPERATOR_KEYS = ("flag_rate", "unflagged_binary_accuracy", "defective_missed_rate", "defective_escape_rate",
                 "functional_false_alarm_rate")


def is_bundle(path: Path) -> bool:
    return (Path(path) / "manifest.json").is_file()


def evaluate_bundle(bundle: Path, split: str, limit: int | None = None, seed: int = 0) -> dict:
    """Metrics of the INT8 graphs (flat keys) plus `fp32_*` twins and the INT8 drop in points."""
    bundle = Path(bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = PreprocessSpec.from_dict(manifest["preprocessing"])
    tokenizer = TextTokenizer(bundle / "tokenizer.json", spec.max_tokens)
    data = elpv_set(split, spec.image_size, limit=limit, seed=seed)
    backgrounds = data.images[np.asarray(data.levels) == 0][:100]
    syn = synthetic_set(f"synthetic-{split}", min(limit or 400, 400), spec.image_size,
                        SYNTHETIC_EVAL_SEED[split], 0.5, backgrounds)
    catalog = load_catalog(bundle / "catalog.yaml")
    metrics = {"model": str(bundle), "model_version": manifest["version"], "split": split}
    for prefix, int8 in (("", True), ("fp32_", False)):
        backend = OnnxBackend(bundle, int8=int8)
        patches, rewards, blank = catalog_outputs(backend, tokenizer, spec, data.images, catalog)
        m, ordered = elpv_metrics(rewards, data)
        if int8:
            m.update(operator_metrics(manifest, catalog, patches, rewards, blank, data.levels))
        syn_pairs = pair_correct(verify.backend_set_scores(backend, tokenizer, spec, syn, seed))
        el_pairs = pair_correct(ordered)
        m.update(elpv_pairwise_accuracy=float(el_pairs.mean()), synthetic_pairwise_accuracy=float(syn_pairs.mean()),
                 pairwise_accuracy=float(np.concatenate([syn_pairs.ravel(), el_pairs.ravel()]).mean()))
        metrics.update({f"{prefix}{k}": v for k, v in m.items()})
    for key in HEADLINE:
        metrics[f"int8_drop_points_{key}"] = 100 * (metrics[f"fp32_{key}"] - metrics[key])
    return metrics


def operator_metrics(manifest: dict, catalog, patches, rewards, blank, levels, **overrides) -> dict:
    """The line's view with the bundle's flag thresholds (overrides as on the appliance): the
    share of frames flagged for review, the binary accuracy of the verdicts that are not, and
    the defective cells that pass unflagged with a defect-free verdict (escapes) — the
    number a quality engineer cares about. The verdict is the top catalog entry, as on the
    appliance (elpv_binary_accuracy sums p over the defective entries instead)."""
    thresholds = decide.Thresholds.from_manifest(manifest["thresholds"], **overrides)
    defective = catalog_defective(catalog)
    flagged = np.array([decide.decide(catalog.displays, r, blank, p, thresholds, manifest["ood"], list(defective)).flagged
                        for r, p in zip(rewards, patches)])
    return flag_outcomes(defective[rewards.argmax(1)], np.asarray(levels) >= 2, flagged)
