"""How far a bundle's INT8 image encoder is from its own fp32 graph, and both from a reference
bundle's fp32 graph: signal-to-noise ratio of the patch features over the val cells, in dB.

    .venv/bin/python reports/experiments/qat/int8_snr.py /tmp/v3r-eval /tmp/v3r-eval /tmp/qat/bundle-a /tmp/qat/bundle-b
(the first path is the reference)
"""
import json
import sys

import numpy as np
import onnxruntime as ort

from models.preprocess import PreprocessSpec, normalize
from training.data.batches import elpv_set


def patches(path: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 32]})[0] for i in range(0, len(x), 32)])


def snr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10((a ** 2).mean() / ((a - b) ** 2).mean()))


reference, bundles = sys.argv[1], sys.argv[2:]
spec = PreprocessSpec.from_dict(json.load(open(f"{reference}/manifest.json"))["preprocessing"])
x = normalize(elpv_set("val", spec.image_size).images, spec)
ref = patches(f"{reference}/image_encoder.onnx", x)
for b in bundles:
    fp32, int8 = patches(f"{b}/image_encoder.onnx", x), patches(f"{b}/image_encoder.int8.onnx", x)
    print(f"{b}: INT8 vs its own fp32 {snr(fp32, int8):.1f} dB | INT8 vs reference fp32 {snr(ref, int8):.1f} dB"
          f" | fp32 vs reference fp32 {snr(ref, fp32):.1f} dB")
