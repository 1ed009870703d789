"""`linejudge eval --model <bundle>`: the exported graphs on the fixed ELPV split, INT8 beside fp32.

What the appliance runs is judged with the same metrics as the torch model (ELPV binary and
4-level accuracy, pairwise accuracy on ELPV and synthetic candidate sets), once with the fp32
graphs and once with the INT8 ones, so the cost of quantization on the *test* split is a
number anyone can rerun (the export gate only sees val).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from appliance.candidates import load_catalog
from appliance.preprocess import PreprocessSpec, TextTokenizer
from appliance.scoring.onnx_backend import OnnxBackend
from export import verify
from training.data.batches import elpv_set, synthetic_set
from training.evaluate import SYNTHETIC_EVAL_SEED, elpv_metrics, pair_correct

HEADLINE = ("elpv_binary_accuracy", "elpv_level_accuracy", "elpv_pairwise_accuracy",
            "synthetic_pairwise_accuracy", "pairwise_accuracy")


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
    displays = load_catalog(bundle / "catalog.yaml").displays
    metrics = {"model": str(bundle), "model_version": manifest["version"], "split": split}
    for prefix, int8 in (("", True), ("fp32_", False)):
        backend = OnnxBackend(bundle, int8=int8)
        m, ordered = elpv_metrics(verify.backend_scores(backend, tokenizer, spec, data.images, displays), data)
        syn_pairs = pair_correct(verify.backend_set_scores(backend, tokenizer, spec, syn, seed))
        el_pairs = pair_correct(ordered)
        m.update(elpv_pairwise_accuracy=float(el_pairs.mean()), synthetic_pairwise_accuracy=float(syn_pairs.mean()),
                 pairwise_accuracy=float(np.concatenate([syn_pairs.ravel(), el_pairs.ravel()]).mean()))
        metrics.update({f"{prefix}{k}": v for k, v in m.items()})
    for key in HEADLINE:
        metrics[f"int8_drop_points_{key}"] = 100 * (metrics[f"fp32_{key}"] - metrics[key])
    return metrics
