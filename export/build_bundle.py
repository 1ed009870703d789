"""`linejudge export`: a trained run -> a signed, self-describing model bundle.

Steps, each checked before the next:
  1. torch -> ONNX fp32 (three graphs); parity vs torch on golden frames (<= 1e-4)
  2. ONNX fp32 -> INT8 (image encoder, scorer); gate on the val split
  3. catalog embeddings, tokenizer, golden frames with expected verdicts
  4. thresholds calibrated on val, out-of-distribution statistics
  5. manifest (files, hashes, lineage, metrics) and ed25519 signature
"""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from models.catalog import load_catalog
from models.common import is_whole
from models.errors import ConfigError, LinejudgeError
from models.preprocess import PreprocessSpec, TextTokenizer, normalize
from appliance.scoring.onnx_backend import OnnxBackend
from export import decide_stats, quantize, to_onnx, verify
from models import bundle as bundle_lib
from models.platform import platform_record
from models.reward_model import load_model, minilm_dir
from training.data import elpv
from training.data.batches import EL_CATALOG, elpv_set, synthetic_set
from training.metrics import pair_correct, right_first

GOLDEN_FRAMES = 8
DIM_GOLDEN_GAIN = 0.5        # with a white point, the golden frames again at this exposure
CALIBRATION_FRAMES = 320


class ExportGateError(LinejudgeError):
    """An export step failed its check; nothing is written as a finished bundle."""


@dataclass(frozen=True)
class ExportOptions:
    line: str = "el-solar"
    version: int = 1
    expires_days: float | None = 365.0
    calibration: str = "minmax"
    keep_fp32: tuple[str, ...] = ()
    key: Path | None = None
    key_id: str | None = None
    val_limit: int | None = None
    calibration_frames: int = CALIBRATION_FRAMES
    parent_version: int | None = None
    feedback_ids: tuple[str, ...] = ()
    gate_points: float = 0.5          # max loss of INT8, in points: pairwise accuracy and ELPV binary accuracy
    gate_binary: float = 0.98         # min agreement INT8 vs fp32 on the binary verdict (defective or not), ELPV val
    gate_top1: float = 0.97           # min top-1 agreement INT8 vs fp32 (the exact catalog entry; ELPV val + synthetic)

    def __post_init__(self):
        for name, value, example in (("version", self.version, 2),
                                     ("calibration_frames", self.calibration_frames, CALIBRATION_FRAMES),
                                     ("val_limit", 1 if self.val_limit is None else self.val_limit, 200)):
            if not is_whole(value) or value < 1:
                raise ConfigError(f"export {name} must be a whole number of at least 1, "
                                  f"e.g. --{name.replace('_', '-')} {example}; got {value!r}")


def student_dir(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    for candidate in (checkpoint / "distill" / "model", checkpoint):
        if (candidate / "model.safetensors").exists():
            return candidate
    raise ExportGateError(f"{checkpoint} has no distilled student (distill/model); "
                          f"finish `linejudge train` first")


def checkpoint_to_bundle(checkpoint: Path, out: Path, opts: ExportOptions) -> dict:
    """Build the bundle in `<out>.partial` and rename it to `out` only when every step passed:
    a failed export leaves `out` as it was and no `.partial` behind."""
    if opts.key:
        bundle_lib.load_private_key(opts.key)    # a bad key fails here, before any export work
    model = load_model(student_dir(checkpoint))
    return _build_then_rename(Path(out), lambda partial: partial.mkdir(parents=True),
                              lambda partial: _build_bundle(model, Path(checkpoint), partial, opts))


def _build_then_rename(final: Path, prepare, build) -> dict:
    """prepare(partial) then build(partial) -> manifest in `<final>.partial`; renamed to `final`
    only when build returned, removed when anything raised."""
    partial = final.with_name(final.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    try:
        prepare(partial)
        manifest = build(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    return manifest


def _build_bundle(model, run_dir: Path, out: Path, opts: ExportOptions) -> dict:
    """The five steps, written into `out`."""
    cfg = model.config
    spec = cfg.preprocess_spec()
    tokenizer = TextTokenizer(minilm_dir() / "tokenizer.json", spec.max_tokens)
    catalog = load_catalog(EL_CATALOG)
    steps = tqdm(total=5, desc="export", dynamic_ncols=True)

    # 1. ONNX fp32 + parity
    to_onnx.torch_to_onnx(model, out)
    val = elpv_set("val", spec.image_size, limit=opts.val_limit)
    golden_idx = _golden_indices(val)
    ids, mask = tokenizer.encode(catalog.displays)
    parity = to_onnx.check_parity(model, out, normalize(val.images[golden_idx], spec), ids, mask)
    steps.update()

    # 2. INT8 with the saturation check and the accuracy gate
    np.save(out / "catalog_embeddings.npy", OnnxBackend(out, int8=False).text_features(ids, mask).astype(np.float32))
    shutil.copy(minilm_dir() / "tokenizer.json", out / "tokenizer.json")
    shutil.copy(EL_CATALOG, out / "catalog.yaml")
    int8 = _int8_steps(out, spec, tokenizer, catalog, val, golden_idx, opts)
    steps.update(3)       # 2. INT8, 3. catalog and golden frames, 4. thresholds

    # 5. manifest + signature
    manifest = bundle_lib.build_manifest(
        out, line=opts.line, version=opts.version, expires_days=opts.expires_days,
        compatible={"input": input_spec(spec), "opset": to_onnx.OPSET, "onnxruntime": ">=1.18"},
        preprocessing={**spec.to_dict(), "color": "gray", "resize": "INTER_AREA"},
        thresholds=int8.stats["thresholds"], ood=int8.stats["ood"],
        lineage=_lineage(run_dir, opts), metrics={"parity_fp32": parity, "int8_gate": int8.gate,
                                                   "golden_frames": len(int8.golden), **_eval_metrics(run_dir)},
        extra={"graphs": int8.graphs, "quantization": int8.quantization, "exported_on": int8.exported_on,
               "model": {"name": cfg.name, "parameters": model.parameter_count()}})
    bundle_lib.write_manifest(out, manifest)
    if opts.key:
        bundle_lib.sign_bundle(out, opts.key, opts.key_id)
    steps.update()
    steps.close()
    return manifest


def recalibrate_bundle(bundle: Path, key: Path, key_id: str, trusted: dict) -> dict:
    """Derive an exported bundle's decide thresholds and OOD statistics again on val with its
    INT8 graphs, as export does, and sign the new manifest: a change of threshold policy
    without a new export. Only a bundle that verifies against `trusted` keys is re-signed;
    graphs, files and version stay as they are (appliances that already run this version keep
    its old thresholds until they install it again); lineage records the step."""
    bundle = Path(bundle)
    manifest = bundle_lib.verify_bundle(bundle, trusted)
    bundle_lib.load_private_key(key)          # a bad key fails here, before anything is written
    spec = PreprocessSpec.from_dict(manifest["preprocessing"])
    tokenizer = TextTokenizer(bundle / "tokenizer.json", spec.max_tokens)
    stats = decide_stats.calibrate(OnnxBackend(bundle, int8=True), tokenizer, spec,
                                   elpv_set("val", spec.image_size), load_catalog(bundle / "catalog.yaml"))
    lineage = {**manifest["lineage"], "recalibrated": {"by": "linejudge bundle recalibrate",
                                                       "at": bundle_lib.iso_now()}}
    manifest = {**manifest, "thresholds": stats["thresholds"], "ood": stats["ood"], "lineage": lineage}
    bundle_lib.write_manifest(bundle, manifest)
    bundle_lib.sign_bundle(bundle, key, key_id)
    return manifest


def export_with_settings(run_dir: Path, out: Path, settings: dict) -> dict:
    """checkpoint_to_bundle with ExportOptions given as a dict: the exporter HQ's fleet retrain
    (training/hq/retrain.py) is handed by its caller."""
    return checkpoint_to_bundle(run_dir, out, ExportOptions(**settings))


REQUANTIZED = {"image_encoder.int8.onnx", "scorer.int8.onnx", "golden", "manifest.json", "manifest.sig"}


def requantize_bundle(bundle: Path, out: Path, key: Path, key_id: str, trusted: dict,
                      opts: ExportOptions) -> dict:
    """A verified bundle's fp32 graphs -> a new version with INT8 graphs made again as export
    makes them (7-bit weights, the saturation check, the accuracy gate, golden frames of both
    precisions, thresholds), signed. For bundles whose INT8 graphs predate a quantization fix:
    no trained run is needed, the fp32 graphs, catalog and tokenizer are kept byte for byte.
    Built in `<out>.partial` and renamed only when every step passed; `out` may be `bundle`."""
    bundle, final = Path(bundle), Path(out)
    old = bundle_lib.verify_bundle(bundle, trusted)
    bundle_lib.load_private_key(key)          # a bad key fails here, before any work

    def copy_kept_files(partial: Path) -> None:
        shutil.copytree(bundle, partial, ignore=lambda d, names: [n for n in names if n in REQUANTIZED
                                                                  and Path(d) == bundle])

    def requantize(partial: Path) -> dict:
        manifest = _requantized_manifest(old, partial, opts)
        bundle_lib.write_manifest(partial, manifest)
        bundle_lib.sign_bundle(partial, key, key_id)
        return manifest
    return _build_then_rename(final, copy_kept_files, requantize)


def _requantized_manifest(old: dict, out: Path, opts: ExportOptions) -> dict:
    spec = PreprocessSpec.from_dict(old["preprocessing"])
    tokenizer = TextTokenizer(out / "tokenizer.json", spec.max_tokens)
    catalog = load_catalog(out / "catalog.yaml")
    val = elpv_set("val", spec.image_size, limit=opts.val_limit)
    int8 = _int8_steps(out, spec, tokenizer, catalog, val, _golden_indices(val), opts)
    version = max(opts.version, int(old["version"]) + 1)
    lineage = {**old["lineage"], "parent_version": int(old["version"]),
               "requantized": {"by": "linejudge bundle requantize", "at": bundle_lib.iso_now(),
                               "from_version": int(old["version"]), "git_commit": _git_commit()}}
    metrics = {**old["metrics"], "int8_gate": int8.gate, "golden_frames": len(int8.golden)}
    keep = {k: old[k] for k in ("model",) if k in old}
    return bundle_lib.build_manifest(
        out, line=old["line"], version=version, expires_days=opts.expires_days,
        compatible=old["compatible"], preprocessing=old["preprocessing"],
        thresholds=int8.stats["thresholds"], ood=int8.stats["ood"], lineage=lineage, metrics=metrics,
        extra={**keep, "graphs": int8.graphs, "quantization": int8.quantization,
               "exported_on": int8.exported_on})


def input_spec(spec: PreprocessSpec) -> dict:
    return {"image": [1, spec.image_size, spec.image_size], "dtype": "float32",
            "max_tokens": spec.max_tokens}


def _golden_indices(val) -> np.ndarray:
    """A few val frames of every defect level (the swap check's fixed set)."""
    levels = np.asarray(val.levels)
    picks = [np.flatnonzero(levels == lvl)[:2] for lvl in range(4)]
    return np.concatenate(picks)[:GOLDEN_FRAMES]


def _calibration_feeds(out: Path, spec, tokenizer, catalog, n: int) -> tuple[list, list]:
    cells = elpv.cells_for("train", limit=n, seed=1234)
    frames = normalize(elpv.load_images(cells, spec.image_size), spec)
    image_feeds = [{"image": frames[i:i + 1]} for i in range(len(frames))]
    fp32 = OnnxBackend(out, int8=False)
    ids, mask = tokenizer.encode(catalog.displays)
    texts = fp32.text_features(ids, mask)
    scorer_feeds = [{"patches": fp32.image_features(frames[i:i + 8]), "text_features": texts}
                    for i in range(0, len(frames), 8)]
    return image_feeds, scorer_feeds


@dataclass(frozen=True)
class Int8Result:
    """What the INT8 steps leave for the manifest."""
    graphs: dict
    quantization: dict
    gate: dict
    golden: list
    stats: dict
    exported_on: dict


def _int8_steps(out: Path, spec, tokenizer, catalog, val, golden_idx, opts: ExportOptions) -> Int8Result:
    """fp32 graphs in `out` -> INT8 graphs (checked against int16 saturation), the accuracy
    gate on val, golden frames recorded with both precisions, thresholds from the INT8 graphs."""
    graphs, quantization = _quantize(out, spec, tokenizer, catalog, opts)
    fp32_backend, int8_backend = OnnxBackend(out, int8=False), OnnxBackend(out, int8=True)
    gate = _int8_gate(fp32_backend, int8_backend, tokenizer, spec, val, catalog, opts, out)
    golden = _write_golden(out, int8_backend, fp32_backend, tokenizer, spec, val, golden_idx, catalog)
    stats = decide_stats.calibrate(int8_backend, tokenizer, spec, val, catalog)
    return Int8Result(graphs, quantization, gate, golden, stats, platform_record(int8_backend.provider))


def _quantize(out: Path, spec, tokenizer, catalog, opts: ExportOptions) -> tuple[dict, dict]:
    image_feeds, scorer_feeds = _calibration_feeds(out, spec, tokenizer, catalog, opts.calibration_frames)
    image, scorer = out / "image_encoder.onnx", out / "scorer.onnx"
    image_names, scorer_names = quantize.node_names(image), quantize.node_names(scorer)
    unmatched = [p for p in opts.keep_fp32 if not quantize.matching_nodes(image_names + scorer_names, [p])]
    if unmatched:
        raise ConfigError(f"--keep-fp32 {' '.join(unmatched)} names no node of the image encoder or "
                          f"scorer; give a node name or a prefix ending in '/' such as /blocks.0/")
    image_keep = quantize.stem_nodes(image) + quantize.matching_nodes(image_names, list(opts.keep_fp32))
    scorer_keep = quantize.head_nodes(scorer) + quantize.matching_nodes(scorer_names, list(opts.keep_fp32))
    graphs, checks = {"text_encoder": "text_encoder.onnx"}, {}
    for stem, feeds, keep, ops in (("image_encoder", image_feeds, image_keep, None),
                                   ("scorer", scorer_feeds, scorer_keep, ["MatMul", "Gemm"])):
        target = out / f"{stem}.int8.onnx"
        quantize.onnx_to_int8(out / f"{stem}.onnx", target, feeds, opts.calibration, keep, ops)
        checks[stem] = _saturation_checked(target)
        graphs[stem] = target.name
    return graphs, {"format": quantize.WEIGHT_FORMAT, "calibration": opts.calibration,
                    "calibration_frames": len(image_feeds), "kept_fp32": list(opts.keep_fp32),
                    # a prefix matches in both graphs ("/blocks.0/": EfficientNet block 0 and the
                    # scorer's fusion block): the weighted nodes each graph really kept in fp32
                    "kept_fp32_nodes": {"image_encoder": quantize.weighted_nodes(image, image_keep),
                                        "scorer": quantize.weighted_nodes(scorer, scorer_keep)},
                    "int16_pair_check": checks}


def _saturation_checked(int8_path: Path) -> dict:
    check = quantize.int16_pair_check(int8_path)
    if not check["ok"]:
        worst = ", ".join(f"{row['node']} ({row['worst_pair_sum']})" for row in check["saturating_ops"][:3])
        raise ExportGateError(
            f"{int8_path.name}: {len(check['saturating_ops'])} quantized layers can overflow int16 on CPUs "
            f"without VNNI (worst u8 x s8 pair sums {worst}, limit {check['limit']}); their answers would "
            f"differ from machine to machine. Quantize with 7-bit weights (reduce_range) or keep those "
            f"layers fp32 with --keep-fp32")
    return check


def _int8_gate(fp32, int8, tokenizer, spec, val, catalog, opts: ExportOptions, out: Path) -> dict:
    truth = np.array([val.truth(i) for i in range(len(val))])
    a = verify.backend_scores(fp32, tokenizer, spec, val.images, catalog.displays)
    b = verify.backend_scores(int8, tokenizer, spec, val.images, catalog.displays)
    syn = synthetic_set("synthetic-gate", 200, spec.image_size, 4242, 0.0, None)
    sa = verify.backend_set_scores(fp32, tokenizer, spec, syn)
    sb = verify.backend_set_scores(int8, tokenizer, spec, syn)
    pa = np.concatenate([pair_correct(right_first(a, truth)).ravel(), pair_correct(sa).ravel()]).mean()
    pb = np.concatenate([pair_correct(right_first(b, truth)).ravel(), pair_correct(sb).ravel()]).mean()
    agree = verify.agreement(a, b)
    syn_agree = float((sa.argmax(1) == sb.argmax(1)).mean())
    top1 = (agree["top1_agreement"] * len(a) + syn_agree * len(sa)) / (len(a) + len(sa))
    defective = decide_stats.catalog_defective(catalog)
    called_a, called_b, truly = defective[a.argmax(1)], defective[b.argmax(1)], defective[truth]
    gate = {"split": "val", "pairwise_fp32": float(pa), "pairwise_int8": float(pb),
            "pairwise_drop_points": float((pa - pb) * 100), "top1_agreement": float(top1),
            "binary_fp32": float((called_a == truly).mean()), "binary_int8": float((called_b == truly).mean()),
            "binary_agreement": float((called_a == called_b).mean()),
            "calibration": opts.calibration, "kept_fp32": list(opts.keep_fp32)}
    gate["binary_drop_points"] = (gate["binary_fp32"] - gate["binary_int8"]) * 100
    gate["binary_cells"] = {"val": len(a), "right_only_fp32": int(((called_a == truly) & (called_b != truly)).sum()),
                            "right_only_int8": int(((called_b == truly) & (called_a != truly)).sum())}
    if _gate_fails(gate, opts):
        layers = quantize.diverging_layers(out / "image_encoder.onnx", out / "image_encoder.int8.onnx",
                                           [{"image": normalize(val.images[:4], spec)}])
        worst = ", ".join(f"{row['tensor']} ({row['sqnr_db']:.1f} dB)" for row in layers)
        raise ExportGateError(
            f"INT8 fails the gate: pairwise {pa:.4f} -> {pb:.4f} ({gate['pairwise_drop_points']:.2f} points, "
            f"limit {opts.gate_points}), ELPV binary {gate['binary_fp32']:.4f} -> {gate['binary_int8']:.4f} "
            f"(limit {opts.gate_points} points; {_cells(gate['binary_cells'])}), binary verdict agreement {gate['binary_agreement']:.4f} "
            f"(min {opts.gate_binary}), top-1 agreement {top1:.4f} (min {opts.gate_top1}). Most divergent "
            f"tensors: {worst}. Try "
            f"--calibration entropy|percentile or --keep-fp32 <node or prefix/> (e.g. /blocks.0/).")
    return gate


def _cells(cells: dict) -> str:
    """The binary drop as cells: few val cells flip, so a drop of a point can be two or three of them."""
    return (f"{cells['right_only_fp32']} val cells right only with fp32, {cells['right_only_int8']} only "
            f"with INT8, of {cells['val']}")


def _gate_fails(gate: dict, opts: ExportOptions) -> bool:
    """INT8 must judge as fp32 does: lose at most gate_points of pairwise and of ELPV binary
    accuracy, call the same cells defective (gate_binary), and pick the same catalog entry for
    at least gate_top1 of the frames. The last is a floor against broken quantization, not
    0.99: a model that uses the middle ELPV levels has near-ties between adjacent levels, which
    any rounding flips without changing the binary verdict (reports/measurements.md)."""
    return (gate["pairwise_drop_points"] > opts.gate_points or gate["binary_drop_points"] > opts.gate_points
            or gate["binary_agreement"] < opts.gate_binary or gate["top1_agreement"] < opts.gate_top1)


def _write_golden(out: Path, int8_backend, fp32_backend, tokenizer, spec, val, idx, catalog) -> list[dict]:
    """Golden frames with the verdict and rewards of each precision: the appliance checks the
    INT8 graphs against the first, and its fp32 fallback against the second. With a white point,
    each golden frame also comes at DIM_GOLDEN_GAIN of its exposure: an appliance whose software
    predates the white point (and skips it) then fails the check instead of judging dim frames
    unlike HQ."""
    golden_dir = out / "golden"
    if golden_dir.exists():
        shutil.rmtree(golden_dir)
    golden_dir.mkdir()
    images, cells = val.images[idx], [val.ids[i] for i in idx]
    if spec.white_point is not None:
        images = np.concatenate([images, (images * DIM_GOLDEN_GAIN).astype(np.uint8)])
        cells += [f"{c} at x{DIM_GOLDEN_GAIN} exposure" for c in cells]
    scores = verify.backend_scores(int8_backend, tokenizer, spec, images, catalog.displays)
    scores_fp32 = verify.backend_scores(fp32_backend, tokenizer, spec, images, catalog.displays)
    rows = []
    for i, (image, cell, s, s32) in enumerate(zip(images, cells, scores, scores_fp32)):
        name = f"golden_{i:02d}.png"
        cv2.imwrite(str(golden_dir / name), image)
        rows.append({"frame": name, "cell": cell, "verdict": catalog.displays[int(s.argmax())],
                     "rewards": [round(float(v), 5) for v in s],
                     "verdict_fp32": catalog.displays[int(s32.argmax())],
                     "rewards_fp32": [round(float(v), 5) for v in s32]})
    (golden_dir / "expected.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def _lineage(run_dir: Path, opts: ExportOptions) -> dict:
    config = _read_json(run_dir / "config.json")
    return {"parent_version": opts.parent_version, "training_config": config.get("name"),
            "training_config_hash": config.get("hash"), "git_commit": _git_commit(),
            "data": {"elpv_split_sha256": bundle_lib.file_sha256(elpv.SPLIT_FILE),
                     "catalog_sha256": bundle_lib.file_sha256(EL_CATALOG)},
            "feedback_ids": list(opts.feedback_ids)}


def _eval_metrics(run_dir: Path) -> dict:
    for name in ("eval_test.json", "eval_val.json"):
        data = _read_json(run_dir / name)
        if data:
            keys = ("split", "elpv_binary_accuracy", "elpv_level_accuracy", "pairwise_accuracy",
                    "image_swap_accuracy", "heldout_phrasing_accuracy", "ece")
            return {"eval": {k: data[k] for k in keys if k in data}}
    return {}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except OSError:
        return None
