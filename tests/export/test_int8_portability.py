"""INT8 that gives the same answers on every CPU: no u8 x s8 pair sum can overflow int16.

On x86 without VNNI onnxruntime sums pairs of u8 x s8 products in 16 bits; the default bundle
of main a321dcc (8-bit weights) had pair sums up to 64,770 and gave a reward 3.68 off on such a
CPU. The last tests run the shipped graphs on an AVX2-only CPU and compare with the rewards
recorded at export: this CPU itself where it has no VNNI, else an emulated AMD EPYC Rome (AVX2,
no AVX-512, no VNNI) where qemu-user is installed (`make test` installs it).
"""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

from models.preprocess import PreprocessSpec, frame_to_input
from appliance.scoring.onnx_backend import OnnxBackend
from export import quantize
from export.build_bundle import ExportGateError, _saturation_checked
from models.platform import cpu_flags, has_vnni

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "models" / "bundles" / "el-solar-default"
AVX2_ONLY_CPU = "EPYC-Rome"       # qemu's model of a Zen 2 EPYC: AVX2, no AVX-512, no VNNI


def test_shipped_int8_graphs_cannot_overflow_int16():
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    for stem in ("image_encoder", "scorer"):
        check = quantize.int16_pair_check(BUNDLE / manifest["graphs"][stem])
        assert check["ok"], check["saturating_ops"][:3]
        assert check["worst_pair_sum"] <= quantize.INT16_MAX
        assert check["ops_with_int8_weights"] > 0          # it looked at real layers
        assert manifest["quantization"]["int16_pair_check"][stem] == check   # what export recorded


def test_manifest_records_format_and_where_it_was_exported():
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    assert "7 bits" in manifest["quantization"]["format"]
    exported_on = manifest["exported_on"]
    assert exported_on["onnxruntime"] and exported_on["provider"] == "CPUExecutionProvider"
    assert isinstance(exported_on["isa"], list) and isinstance(exported_on["vnni"], bool)


def _conv_model(path: Path, weight: np.ndarray) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[1], 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    graph = helper.make_graph([conv], "g", [x], [y], [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _feeds(channels: int) -> list[dict]:
    rng = np.random.default_rng(0)
    return [{"x": rng.uniform(0, 4, (1, channels, 8, 8)).astype(np.float32)} for _ in range(4)]


def test_export_quantization_keeps_weights_in_seven_bits(tmp_path):
    weight = np.random.default_rng(1).normal(size=(8, 4, 3, 3)).astype(np.float32)
    fp32 = _conv_model(tmp_path / "conv.onnx", weight)
    int8 = quantize.onnx_to_int8(fp32, tmp_path / "conv.int8.onnx", _feeds(4))
    check = quantize.int16_pair_check(int8)
    assert check["ok"] and check["ops_with_int8_weights"] == 1
    assert check["worst_pair_sum"] == 2 * 255 * 64     # per-channel max |w| is 64 in every channel


def test_eight_bit_weights_fail_the_check_and_export_refuses_them(tmp_path):
    weight = np.random.default_rng(1).normal(size=(8, 4, 3, 3)).astype(np.float32)
    fp32 = _conv_model(tmp_path / "conv.onnx", weight)
    target = tmp_path / "conv.int8.onnx"
    quantize_static(str(fp32), str(target), quantize.ArrayReader(_feeds(4)), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    check = quantize.int16_pair_check(target)
    assert not check["ok"]
    assert check["saturating_ops"][0]["node"] == "conv" and check["worst_pair_sum"] > quantize.INT16_MAX
    with pytest.raises(ExportGateError, match="overflow int16 on CPUs without VNNI"):
        _saturation_checked(target)


def _chain_model(path: Path) -> Path:
    """x -> conv a -> conv b -> conv c; b's output channels differ in scale by 1000x, so that one
    scale for all of b's weights (per tensor) rounds its small channel to nothing."""
    rng = np.random.default_rng(2)
    wb = rng.normal(size=(4, 4, 3, 3)).astype(np.float32)
    wb[0] *= 1e-3
    weights = {"wa": rng.normal(size=(4, 4, 3, 3)).astype(np.float32), "wb": wb,
               "wc": rng.normal(size=(4, 4, 3, 3)).astype(np.float32)}
    nodes = [helper.make_node("Conv", [i, w], [o], name=n, pads=[1, 1, 1, 1])
             for n, i, w, o in (("a", "x", "wa", "ha"), ("b", "ha", "wb", "hb"), ("c", "hb", "wc", "y"))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(v, k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_layer_kept_fp32_inside_the_int8_graph_runs_in_fp32(tmp_path):
    """onnxruntime would quantize a float conv between DQ and Q itself (per tensor, 8 bits) at
    session start; the backend's sessions run the graph as saved, as its QDQ nodes say."""
    import onnxruntime as ort
    from appliance.scoring.onnx_backend import inference_session
    int8 = quantize.onnx_to_int8(_chain_model(tmp_path / "chain.onnx"), tmp_path / "chain.int8.onnx",
                                 _feeds(4), keep_fp32=["b"])
    assert quantize.int16_pair_check(int8)["ops_with_int8_weights"] == 2     # saved with a, c INT8 and b fp32
    feed, cpu = _feeds(4)[0], ["CPUExecutionProvider"]
    literal = ort.SessionOptions()
    literal.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    as_saved = ort.InferenceSession(str(int8), literal, providers=cpu).run(None, feed)[0]  # b's weights fp32
    ours = inference_session(ort, int8, ort.SessionOptions(), cpu).run(None, feed)[0]
    np.testing.assert_allclose(ours, as_saved, rtol=1e-4, atol=1e-4 * np.abs(as_saved).max())
    plain = ort.InferenceSession(str(int8), providers=cpu).run(None, feed)[0]   # defaults: b quantized behind our back
    assert np.abs(plain - as_saved).max() > 100 * np.abs(ours - as_saved).max()


# ------------------------------------------------------------ an emulated AVX2-only CPU

HOST_IS_AVX2_ONLY = platform.machine() == "x86_64" and "avx2" in cpu_flags() and not has_vnni(cpu_flags())
needs_avx2_only_cpu = pytest.mark.skipif(
    not HOST_IS_AVX2_ONLY and (shutil.which("qemu-x86_64") is None or platform.machine() != "x86_64"),
    reason="this CPU has VNNI and qemu-user (qemu-x86_64) is not installed: `apt-get install qemu-user`")

PROBE = """
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
a = helper.make_tensor_value_info("a", TensorProto.UINT8, [1, 64])
b = helper.make_tensor_value_info("b", TensorProto.INT8, [64, 16])
y = helper.make_tensor_value_info("y", TensorProto.INT32, [1, 16])
g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "g", [a, b], [y])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
out = s.run(None, {"a": np.full((1, 64), 255, np.uint8), "b": np.full((64, 16), 127, np.int8)})[0]
print(int(out.max()))
"""

GOLDEN_REWARDS = """
import json, sys
import cv2, numpy as np
from pathlib import Path
from models.preprocess import PreprocessSpec, frame_to_input
from appliance.scoring.onnx_backend import OnnxBackend
bundle = Path(sys.argv[1])
spec = PreprocessSpec.from_dict(json.loads((bundle / "manifest.json").read_text())["preprocessing"])
backend = OnnxBackend(bundle, int8=True, threads=1)
features = np.load(bundle / "catalog_embeddings.npy")
frames = sorted((bundle / "golden").glob("*.png"))
rows = [backend.rewards(backend.image_features(frame_to_input(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), spec)),
                        features)[0].tolist() for f in frames]
print(json.dumps(rows))
"""


def _on_avx2_only_cpu(code: str, *args: str) -> str:
    """Run `code` on an AVX2-only CPU: this one where it is one (no emulation needed), else qemu's."""
    emulator = [] if HOST_IS_AVX2_ONLY else ["qemu-x86_64", "-cpu", AVX2_ONLY_CPU]
    done = subprocess.run([*emulator, sys.executable, "-c", code, *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@needs_avx2_only_cpu
def test_the_avx2_only_cpu_takes_the_saturating_kernel_path():
    """Without this, the next test would prove nothing: 64 x 255 x 127 exactly is 2,072,640;
    summed in saturating int16 pairs it is 32 x 32,767 = 1,048,544."""
    assert int(_on_avx2_only_cpu(PROBE)) == 32 * quantize.INT16_MAX


@needs_avx2_only_cpu
def test_shipped_int8_graphs_give_the_same_rewards_on_an_avx2_only_cpu():
    """Against the rewards export recorded on its own CPU (manifest exported_on: AVX-512 VNNI for
    the shipped bundle), and, where this CPU has VNNI, against this CPU too."""
    recorded = np.array([row["rewards"] for row in json.loads((BUNDLE / "golden" / "expected.json").read_text())])
    there = np.array(json.loads(_on_avx2_only_cpu(GOLDEN_REWARDS, str(BUNDLE))))
    assert there.shape == recorded.shape == (8, len(np.load(BUNDLE / "catalog_embeddings.npy")))
    assert np.abs(there - recorded).max() < 1e-4            # expected.json keeps 5 decimals
    if not HOST_IS_AVX2_ONLY:
        spec = PreprocessSpec.from_dict(json.loads((BUNDLE / "manifest.json").read_text())["preprocessing"])
        backend = OnnxBackend(BUNDLE, int8=True, threads=1)
        features = np.load(BUNDLE / "catalog_embeddings.npy")
        here = [backend.rewards(backend.image_features(frame_to_input(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE),
                                                                      spec)), features)[0]
                for f in sorted((BUNDLE / "golden").glob("*.png"))]
        assert np.abs(there - np.array(here)).max() < 1e-4
