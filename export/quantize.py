"""ONNX fp32 -> INT8 (static, QDQ, per-channel, 7-bit weights) with an accuracy gate and a
check that no CPU's kernel path can saturate.

Same answers on every CPU: onnxruntime's x86 INT8 kernels multiply uint8 activations by int8
weights; on AVX2 without VNNI (vpmaddubsw) each pair of u8 x s8 products is summed in 16 bits
and saturates at 32,767, which 8-bit weights can exceed (2 x 255 x 128). Weights are therefore
quantized to 7 bits (onnxruntime's reduce_range: |w| <= 64, so 2 x 255 x 64 = 32,640 fits), and
`int16_pair_check` proves it on the written graph: export refuses a graph where it does not
hold. Activation x activation MatMuls (attention) run u8 x u8 kernels that widen to 16 bits
before multiplying and cannot saturate; the check counts them separately.

Calibration frames come deterministically from the ELPV *train* part. The image encoder and
the scorer are quantized; the image encoder's stem convolution (one gray input channel,
cheap) and the scorer's final head stay fp32 (known INT8 failure points), and the text
encoder stays fp32 (it only runs for free text; catalog features are
precomputed). In the scorer only MatMul/Gemm are quantized. The measurements that chose these
defaults (7-bit weights, which blocks stay fp32, the calibration method) are in
reports/measurements.md. If the gate fails, the nodes whose outputs diverge most are reported
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


INT16_MAX = 32767
UINT8_MAX = 255
WEIGHT_FORMAT = ("QDQ: uint8 activations per tensor, int8 weights per channel in 7 bits "
                 "(reduce_range), MinMax-calibrated")


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
    """The MatMul/Gemm/Add nodes after the scorer's last LayerNorm (in node order), kept in fp32:
    in a model with level heads that is the image level head, not the reward head."""
    graph = onnx.load(str(scorer_path)).graph
    names = [n.name for n in graph.node]
    kinds = [n.op_type for n in graph.node]
    last_norm = max((i for i, k in enumerate(kinds) if k in ("LayerNormalization", "ReduceMean")), default=0)
    return [names[i] for i in range(last_norm, len(names)) if kinds[i] in ("MatMul", "Gemm", "Add")]


def weighted_nodes(model_path: Path, names: list[str]) -> list[str]:
    """Of `names`, the nodes INT8 would quantize (Conv, MatMul, Gemm), sorted."""
    kinds = {n.name: n.op_type for n in onnx.load(str(model_path)).graph.node}
    return sorted(n for n in set(names) if kinds.get(n) in ("Conv", "MatMul", "Gemm"))


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
    """Static QDQ quantization, per-channel 7-bit int8 weights, uint8 activations."""
    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, not {method!r}")
    extra = {"CalibStridedMinMax": calibration_stride(len(feeds))}   # chunks for every method
    if method == "percentile":
        extra["CalibPercentile"] = 99.999
    quantize_static(str(fp32_path), str(int8_path), ArrayReader(feeds), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
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


def int16_pair_check(int8_path: Path) -> dict:
    """Can any pair of u8 x s8 products in this graph overflow int16 (AVX2 without VNNI)?

    For every quantized Conv/MatMul/Gemm whose weight is a constant int8 tensor, the worst pair
    sum any input can produce is 2 x 255 x max|w|; it must not exceed 32,767. The bound holds for
    every activation, not only the calibration frames, and whatever order a kernel pairs the
    weights in. Returns the figures the manifest records; `ok` is False where a layer can
    saturate, with those layers listed."""
    graph = onnx.load(str(int8_path)).graph
    constants = {t.name: t for t in graph.initializer}
    constants.update({n.output[0]: n.attribute[0].t for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].type == onnx.AttributeProto.TENSOR})
    dequantized = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    weights, activation_pairs, worst, risky = 0, 0, 0, []
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
            continue
        if not all(name in dequantized for name in node.input[:2]):
            continue                                    # kept in fp32
        weight = constants.get(dequantized[node.input[1]])
        if weight is None:
            activation_pairs += 1                       # u8 x u8: widened before multiplying
            continue
        values = onnx.numpy_helper.to_array(weight)
        weights += 1
        if values.dtype != np.int8:
            continue                                    # u8 x u8 weights: no int16 pair sums
        pair = 2 * UINT8_MAX * int(np.abs(values.astype(np.int32)).max())
        worst = max(worst, pair)
        if pair > INT16_MAX:
            risky.append({"node": node.name, "max_abs_weight": int(np.abs(values.astype(np.int32)).max()),
                          "worst_pair_sum": pair})
    return {"ok": not risky, "limit": INT16_MAX, "worst_pair_sum": worst, "ops_with_int8_weights": weights,
            "activation_x_activation_ops": activation_pairs, "saturating_ops": risky}
