"""GPU paths: onnxruntime CUDA/TensorRT providers and native TensorRT engines.
Marked `gpu`; they skip cleanly on machines without an NVIDIA GPU and the gpu extra."""
import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def _require_gpu():
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no NVIDIA GPU on this machine")


def test_cuda_provider_is_really_used(tiny_bundle):
    _require_gpu()
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed")
    from appliance.scoring.onnx_backend import OnnxBackend
    cpu = OnnxBackend(tiny_bundle[0], ("cpu",), int8=False)
    gpu = OnnxBackend(tiny_bundle[0], ("cuda", "cpu"), int8=False)
    assert gpu.provider == "CUDAExecutionProvider"
    image = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
    assert np.abs(cpu.image_features(image) - gpu.image_features(image)).max() < 1e-3


def test_tensorrt_engines_match_onnx_fp32(tiny_bundle):
    _require_gpu()
    pytest.importorskip("tensorrt")
    pytest.importorskip("cuda.bindings")
    from appliance.scoring.onnx_backend import OnnxBackend
    from appliance.scoring.tensorrt_backend import TensorRTBackend
    ref = OnnxBackend(tiny_bundle[0], int8=False)
    trt_backend = TensorRTBackend(tiny_bundle[0], precision="fp16")
    image = np.random.default_rng(0).normal(size=(1, 1, 64, 64)).astype(np.float32)
    texts = np.load(tiny_bundle[0] / "catalog_embeddings.npy")
    a = ref.rewards(ref.image_features(image), texts)
    b = trt_backend.rewards(trt_backend.image_features(image), texts)
    assert a.shape == b.shape and np.abs(a - b).max() < 0.05
    assert (a.argmax(1) == b.argmax(1)).all()


def test_missing_provider_is_refused_not_silently_replaced(tiny_bundle):
    ort = pytest.importorskip("onnxruntime")
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("TensorRT provider present; the refusal path is for machines without it")
    from models.errors import ModelError
    from appliance.scoring.onnx_backend import OnnxBackend
    with pytest.raises(ModelError, match="not available"):
        OnnxBackend(tiny_bundle[0], ("tensorrt", "cpu"))
    fallback = OnnxBackend(tiny_bundle[0], ("tensorrt", "cpu"), allow_fallback=True)
    assert fallback.provider == "CPUExecutionProvider"
