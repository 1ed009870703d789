"""Which convolutions of the image encoder pay for being INT8 on a CPU without VNNI? The shipped
bundle's fp32 image encoder quantized again (7-bit weights, as export) with different nodes left
in fp32: its fidelity to the fp32 graph (signal-to-noise ratio of the patch features over the
ELPV val cells, dB, as reports/experiments/qat/int8_snr.py) run as saved (the appliance's
sessions) and with onnxruntime's default optimizations (which quantize a float conv that sits
between DQ and Q nodes themselves), the int16 saturation check, and the latency of one frame on
one thread (median of interleaved repeats, each in its own session, as saved).

    .venv/bin/python reports/experiments/int8-depthwise/variants.py build   # quantize + SNR (any load)
    .venv/bin/python reports/experiments/int8-depthwise/variants.py time    # latency (quiet CPU only)

Writes reports/experiments/int8-depthwise/{snr,latency}.json; the graphs go to /tmp/int8-dw.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
from appliance.scoring.onnx_backend import inference_session  # noqa: E402
from export import quantize  # noqa: E402
from models.platform import platform_record  # noqa: E402
from models.preprocess import PreprocessSpec, normalize  # noqa: E402
from training.data import elpv  # noqa: E402
from training.data.batches import elpv_set  # noqa: E402

BUNDLE = ROOT / "models" / "bundles" / "el-solar-default"
WORK = Path("/tmp/int8-dw")
HERE = Path(__file__).parent
FP32 = BUNDLE / "image_encoder.onnx"


def variants() -> dict[str, list[str]]:
    names = quantize.node_names(FP32)
    stem = quantize.stem_nodes(FP32)
    early = quantize.matching_nodes(names, ["/blocks.0/", "/blocks.1/"])
    depthwise = [n for n in names if n.endswith("/_depthwise_conv/Conv")]
    project = [n for n in names if n.endswith("/_project_conv/Conv")]
    return {"shipped (stem, blocks 0-1 fp32)": stem + early,
            "+ every depthwise conv fp32": stem + early + depthwise,
            "stem + every depthwise conv fp32": stem + depthwise,
            "+ every project conv fp32": stem + early + project,
            "fp32 (no quantization)": None}


def path_of(name: str) -> Path:
    return FP32 if name.startswith("fp32") else WORK / f"{name.split(' (')[0].replace(' ', '_').replace('+', 'plus')}.onnx"


def session(path: Path, threads: int = 1, as_saved: bool = True) -> ort.InferenceSession:
    """as_saved: as the appliance runs a bundle graph (appliance.scoring.onnx_backend); else with
    onnxruntime's defaults, which quantize a float conv between DQ and Q themselves."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if as_saved:
        return inference_session(ort, path, options, ["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def features(path: Path, x: np.ndarray, as_saved: bool = True) -> np.ndarray:
    s = session(path, 2, as_saved)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + 32]})[0] for i in range(0, len(x), 32)])


def snr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10((a ** 2).mean() / ((a - b) ** 2).mean()))


def build() -> None:
    WORK.mkdir(exist_ok=True)
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    spec = PreprocessSpec.from_dict(manifest["preprocessing"])
    cells = elpv.cells_for("train", limit=manifest["quantization"]["calibration_frames"], seed=1234)
    frames = normalize(elpv.load_images(cells, spec.image_size), spec)   # export's calibration frames
    image_feeds = [{"image": frames[i:i + 1]} for i in range(len(frames))]
    x = normalize(elpv_set("val", spec.image_size).images, spec)
    reference = features(FP32, x)
    out = {"bundle": manifest["version"], "val_cells": len(x), "platform": platform_record("CPUExecutionProvider"),
           "shipped_graph_snr_db": snr(reference, features(BUNDLE / "image_encoder.int8.onnx", x)), "variants": {}}
    for name, keep in variants().items():
        if keep is None:
            continue
        quantize.onnx_to_int8(FP32, path_of(name), image_feeds, "minmax", keep)
        check = quantize.int16_pair_check(path_of(name))
        out["variants"][name] = {"snr_db": snr(reference, features(path_of(name), x)),
                                 "snr_db_onnxruntime_defaults": snr(reference, features(path_of(name), x, False)),
                                 "saturation_ok": check["ok"],
                                 "fp32_weighted_nodes": len(quantize.weighted_nodes(FP32, keep))}
        print(name, out["variants"][name], flush=True)
    (HERE / "snr.json").write_text(json.dumps(out, indent=1) + "\n")


def time_all(repeats: int = 5, runs: int = 200) -> None:
    x = np.random.default_rng(0).standard_normal((1, 1, 224, 224)).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in variants()}
    for _ in range(repeats):          # interleaved, so that drift in the machine hits every variant alike
        for name in times:
            s = session(path_of(name))
            feed = {s.get_inputs()[0].name: x}
            for _ in range(20):
                s.run(None, feed)
            t = []
            for _ in range(runs):
                start = time.perf_counter()
                s.run(None, feed)
                t.append(time.perf_counter() - start)
            times[name].append(float(np.median(t)) * 1e3)
    out = {"threads": 1, "frame": [1, 1, 224, 224], "platform": platform_record("CPUExecutionProvider"),
           "median_ms": {k: float(np.median(v)) for k, v in times.items()}, "repeats_ms": times}
    print(json.dumps(out["median_ms"], indent=1))
    (HERE / "latency.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    {"build": build, "time": time_all}[sys.argv[1]]()
