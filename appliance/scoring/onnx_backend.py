"""ONNX Runtime backend: TensorRT -> CUDA -> CPU execution providers, asserted, not assumed."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from models.errors import ModelError

PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "cpu": "CPUExecutionProvider"}
INT8_SUFFIX = ".int8.onnx"
# The scorer is ~70 small ops: one thread is as fast as two up to 64 candidates
# (reports/measurements.md), so it never waits on a thread pool.
SCORER_THREADS = 1
# onnxruntime (1.20 on) quantizes, at session start, the weights of a float Conv/Gemm that sits
# between a DequantizeLinear and a QuantizeLinear: symmetric, per tensor, 8 bits. A layer that
# export keeps in fp32 in the middle of the INT8 graph (--keep-fp32) would run INT8 after all,
# coarser than export's own 7-bit per-channel weights, and with 8-bit weights that can overflow
# int16 on CPUs without VNNI, which export's saturation check (on the saved graph) never sees. With every
# fp32 depthwise conv of v3, the image features' SNR to fp32 was 17.9 dB with the pass, 24.1 without
# (reports/experiments/int8-depthwise/). Graphs without such a layer (the shipped bundles) give
# bit-identical answers either way; an onnxruntime without the pass ignores the name.
DISABLED_OPTIMIZERS = ("WeightBiasQuantization",)


def provider_options(name: str, cache_dir: Path) -> tuple[str, dict]:
    if name == "tensorrt":
        cache_dir.mkdir(parents=True, exist_ok=True)
        return PROVIDERS[name], {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache_dir),
                                 "trt_timing_cache_enable": True, "trt_fp16_enable": True,
                                 "trt_max_workspace_size": 1 << 30}
    return PROVIDERS[name], {}


def _session_options(ort, threads: int | None):
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No busy-waiting between ops: the grabber and the recorder share the cores, and a
    # spinning pool starves them (pipeline bench on 2 cores: 132 -> 246 frames/s).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def inference_session(ort, path: Path, opts, providers: list[str], options: list[dict] | None = None):
    """The one place a bundle graph becomes an onnxruntime session: the graph runs as saved."""
    return ort.InferenceSession(str(path), opts, providers=providers, provider_options=options,
                                disabled_optimizers=list(DISABLED_OPTIMIZERS))


def graph_path(bundle_dir: Path, stem: str, int8: bool) -> Path:
    quantized = bundle_dir / f"{stem}{INT8_SUFFIX}"
    return quantized if int8 and quantized.exists() else bundle_dir / f"{stem}.onnx"


class OnnxBackend:
    def __init__(self, bundle_dir, providers=("cpu",), allow_fallback=False, int8=True,
                 threads: int | None = None, cache_dir: Path | None = None):
        import onnxruntime as ort
        self.bundle_dir = Path(bundle_dir)
        unknown = [p for p in providers if p not in PROVIDERS]
        if unknown:
            raise ModelError(f"unknown execution provider(s) {unknown}; choose from {list(PROVIDERS)}")
        available = set(ort.get_available_providers())
        wanted = [provider_options(p, cache_dir or self.bundle_dir / ".trt_cache") for p in providers]
        usable = [(n, o) for n, o in wanted if n in available]
        if not usable or (usable[0][0] != wanted[0][0] and not allow_fallback):
            raise ModelError(f"execution provider {wanted[0][0]} is not available here (available: "
                             f"{sorted(available)}); install onnxruntime-gpu matching your CUDA/JetPack, "
                             f"or run with providers=['cpu'] / allow_fallback")
        names, options = [n for n, _ in usable], [o for _, o in usable]
        self.sessions = {}
        for stem in ("image_encoder", "text_encoder", "scorer"):
            path = graph_path(self.bundle_dir, stem, int8 and stem != "text_encoder")
            if not path.exists():
                raise ModelError(f"bundle {self.bundle_dir} has no {path.name}; re-export it")
            opts = _session_options(ort, SCORER_THREADS if stem == "scorer" else threads)
            self.sessions[stem] = inference_session(ort, path, opts, names, options)
        self.provider = self.sessions["image_encoder"].get_providers()[0]
        if self.provider != wanted[0][0] and not allow_fallback:
            raise ModelError(f"asked for {wanted[0][0]} but ONNX Runtime runs {self.provider}")
        self.quantized = int8 and graph_path(self.bundle_dir, "image_encoder", True).name.endswith(INT8_SUFFIX)
        self.precision = "int8" if self.quantized else "fp32"

    def image_features(self, image: np.ndarray) -> np.ndarray:
        return self.sessions["image_encoder"].run(None, {"image": image.astype(np.float32, copy=False)})[0]

    def text_features(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.sessions["text_encoder"].run(None, {"input_ids": ids.astype(np.int32),
                                                        "attention_mask": mask.astype(np.int32)})[0]

    def rewards(self, patches: np.ndarray, text_features: np.ndarray) -> np.ndarray:
        return self.sessions["scorer"].run(None, {"patches": patches, "text_features": text_features})[0]
