"""Native TensorRT backend (NVIDIA GPUs, Jetson): engines built on this device by
`appliance/scoring/tensorrt_engine.py` and cached by GPU, TensorRT version, model hash, precision and profile.

Uses the TensorRT 10 tensor API (set_input_shape / set_tensor_address / execute_async_v3)
and cuda-python for device memory. Buffers are allocated per call (simple and correct;
a pool is the next step if profiling asks for it).
"""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from models.errors import ModelError


def _check(result):
    err, *rest = result if isinstance(result, tuple) else (result,)
    from cuda.bindings import runtime as cudart
    if err != cudart.cudaError_t.cudaSuccess:
        raise ModelError(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


class TensorRTBackend:
    def __init__(self, bundle_dir: Path, precision: str = "fp16", cache_dir: Path | None = None):
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError as exc:
            raise ModelError(f"the tensorrt backend needs the gpu extra (tensorrt, cuda-python): {exc}") from None
        from appliance.scoring.tensorrt_engine import bundle_to_engines
        self._trt, self._cudart = trt, cudart
        logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(logger)
        paths = bundle_to_engines(Path(bundle_dir), precision, cache_dir=cache_dir)
        self.engines = {p.name.split("-")[0]: runtime.deserialize_cuda_engine(p.read_bytes()) for p in paths}
        if any(e is None for e in self.engines.values()):
            raise ModelError("a cached TensorRT engine failed to load; delete the .engine_cache and rebuild")
        self.contexts = {k: e.create_execution_context() for k, e in self.engines.items()}
        self.stream = _check(cudart.cudaStreamCreate())
        self._lock = threading.Lock()     # one execution context and stream: the inspection loop and the
                                          # screen's heat map must not interleave shapes and addresses
        self.provider = f"TensorRT {trt.__version__} ({precision})"
        self.quantized, self.precision = precision == "int8", precision

    def _run(self, stem: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        with self._lock:
            return self._run_unlocked(stem, inputs)

    def _run_unlocked(self, stem: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
        trt, cudart = self._trt, self._cudart
        engine, ctx = self.engines[stem], self.contexts[stem]
        buffers = []
        try:
            for name, array in inputs.items():
                array = np.ascontiguousarray(array)
                ctx.set_input_shape(name, array.shape)
                ptr = _check(cudart.cudaMalloc(array.nbytes))
                buffers.append(ptr)
                _check(cudart.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
                ctx.set_tensor_address(name, ptr)
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            out_name = next(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
            out = np.empty(tuple(ctx.get_tensor_shape(out_name)), dtype=np.float32)
            out_ptr = _check(cudart.cudaMalloc(out.nbytes))
            buffers.append(out_ptr)
            ctx.set_tensor_address(out_name, out_ptr)
            if not ctx.execute_async_v3(self.stream):
                raise ModelError(f"TensorRT execution of {stem} failed")
            _check(cudart.cudaMemcpyAsync(out.ctypes.data, out_ptr, out.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
            _check(cudart.cudaStreamSynchronize(self.stream))
            return out
        finally:
            for ptr in buffers:
                cudart.cudaFree(ptr)

    def image_features(self, image):
        return self._run("image_encoder", {"image": image.astype(np.float32)})

    def text_features(self, ids, mask):
        return self._run("text_encoder", {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)})

    def rewards(self, patches, text_features):
        return self._run("scorer", {"patches": patches.astype(np.float32), "text_features": text_features.astype(np.float32)})
