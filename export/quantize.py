"""ONNX fp32 -> INT8 (static, QDQ, per-channel) with an accuracy gate.

Calibration frames come deterministically from the ELPV *train* part. The image encoder and
the scorer are quantized; the image encoder's stem convolution (one gray input channel,
cheap) and the scorer's final head stay fp32 (known INT8 failure points), and the text
encoder stays fp32 (it only runs for free text; catalog features are
precomputed). Measured on the full run's student (ELPV val, 263 cells, top-1 agreement with
fp32): minmax with moving average 0.977, plain minmax 0.985, percentile 99.999 0.989, plain
minmax with the stem in fp32 0.992. In the scorer only MatMul/Gemm are quantized: with its
elementwise ops quantized too, agreement on 200 synthetic candidate sets fell from 0.990 to
0.975. Hence the defaults. If the gate fails, the nodes whose outputs diverge most are reported
(onnxruntime's qdq_loss_debug) and can be kept in fp32 with --keep-fp32.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                      QuantType, quantize_static)

CALIBRATION_CHUNK = 32   # feeds per calibration pass: the histogram methods keep every activation
                         # of a pass in memory (320 frames at 224x224 did not fit in 24 GiB)
METHODS = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
           "percentile": CalibrationMethod.Percentile}


class QuantizationGateError(RuntimeError):
    """INT8 lost too much accuracy; the message lists the layers that diverge most."""


class ArrayReader(CalibrationDataReader):
    """Feeds a list of input dicts to the calibrator, one batch at a time; `set_range` lets
    onnxruntime calibrate in chunks (its CalibStridedMinMax option)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._all = feeds
        self._feeds = iter(feeds)

    def __len__(self) -> int:
        return len(self._all)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._feeds = iter(self._all[start_index:end_index])

    def get_next(self):
        return next(self._feeds, None)


def calibration_stride(n: int, most: int = CALIBRATION_CHUNK) -> int:
    """The largest chunk size <= most that divides n (onnxruntime requires it)."""
    return next(k for k in range(min(most, n), 0, -1) if n % k == 0)


def head_nodes(scorer_path: Path) -> list[str]:
    """The scalar head's MatMul/Gemm/Add nodes after the last LayerNorm: kept in fp32."""
    graph = onnx.load(str(scorer_path)).graph
    names = [n.name for n in graph.node]
    kinds = [n.op_type for n in graph.node]
    last_norm = max((i for i, k in enumerate(kinds) if k in ("LayerNormalization", "ReduceMean")), default=0)
    return [names[i] for i in range(last_norm, len(names)) if kinds[i] in ("MatMul", "Gemm", "Add")]


def node_names(model_path: Path) -> list[str]:
    return [n.name for n in onnx.load(str(model_path)).graph.node]


def matching_nodes(names: list[str], patterns: list[str]) -> list[str]:
    """Node names given exactly, or by a prefix ending in '/' ("/blocks.0/" = every node of
    EfficientNet block 0)."""
    return [n for n in names if any(n == p or (p.endswith("/") and n.startswith(p)) for p in patterns)]


def stem_nodes(image_encoder_path: Path) -> list[str]:
    """The image encoder's first convolution: kept in fp32."""
    graph = onnx.load(str(image_encoder_path)).graph
    return [next(n.name for n in graph.node if n.op_type == "Conv")]


def onnx_to_int8(fp32_path: Path, int8_path: Path, feeds: list[dict[str, np.ndarray]],
                 method: str = "minmax", keep_fp32: list[str] | None = None,
                 op_types: list[str] | None = None) -> Path:
    """Static QDQ quantization, per-channel int8 weights, uint8 activations."""
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, not {method!r}")
    extra = {"CalibStridedMinMax": calibration_stride(len(feeds))}   # chunks for every method
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    quantize_static(str(fp32_path), str(int8_path), ArrayReader(feeds), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=METHODS[method], nodes_to_exclude=list(keep_fp32 or []),
                    op_types_to_quantize=op_types,
                    extra_options=extra)
    return Path(int8_path)


def diverging_layers(fp32_path: Path, int8_path: Path, feeds: list[dict], top: int = 5) -> list[dict]:
    """Nodes whose int8 activations differ most from fp32 (lowest SQNR first)."""
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_activation_error,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)
    tmp = Path(int8_path).parent
    aug_fp32, aug_int8 = tmp / "_debug_fp32.onnx", tmp / "_debug_int8.onnx"
    modify_model_output_intermediate_tensors(str(fp32_path), str(aug_fp32))
    modify_model_output_intermediate_tensors(str(int8_path), str(aug_int8))
    try:
        fp32_acts = collect_activations(str(aug_fp32), ArrayReader(list(feeds)))
        int8_acts = collect_activations(str(aug_int8), ArrayReader(list(feeds)))
        errors = compute_activation_error(create_activation_matching(int8_acts, fp32_acts))
    finally:
        for p in (aug_fp32, aug_int8):
            p.unlink(missing_ok=True)
    computed = _computed_tensors(fp32_path)
    rows = [{"tensor": name, "sqnr_db": float(np.mean(e.get("xmodel_err", [np.inf])))}
            for name, e in errors.items() if name in computed]
    rows = [r for r in rows if np.isfinite(r["sqnr_db"])]
    return sorted(rows, key=lambda r: r["sqnr_db"])[:top]


def _computed_tensors(model_path: Path) -> dict[str, str]:
    """Output tensor -> node name, for nodes that compute something (not constants, shapes or
    padding arithmetic, whose 'error' means nothing)."""
    skip = {"Constant", "Shape", "Gather", "Unsqueeze", "Concat", "Cast", "Slice", "Pad", "Reshape",
            "ConstantOfShape", "Range", "Equal", "Where", "Expand"}
    graph = onnx.load(str(model_path)).graph
    return {out: node.name for node in graph.node if node.op_type not in skip for out in node.output}
