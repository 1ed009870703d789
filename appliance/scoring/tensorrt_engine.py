"""ONNX -> TensorRT engines, built on the target device (an engine only runs on the GPU
and TensorRT version that built it).

Engines are cached under a key of GPU name, TensorRT version, ONNX model hash, precision
and optimisation profile, so a different GPU or TensorRT release rebuilds instead of
failing to load. The candidate axis gets a profile (1..64, optimum 16); the workspace is
bounded so the build fits a Jetson. Needs the `gpu` extra and an NVIDIA GPU.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from models.errors import ModelError

PROFILES = {  # input name -> (min, opt, max) with B = frames, N = candidates
    "image_encoder": {"image": ((1, 1, "S", "S"), (1, 1, "S", "S"), (8, 1, "S", "S"))},
    "scorer": {"patches": ((1, "P", "D"), (1, "P", "D"), (8, "P", "D")),
               "text_features": ((1, "M", "D"), (16, "M", "D"), (64, "M", "D"))},
    "text_encoder": {"input_ids": ((1, "L"), (16, "L"), (64, "L")),
                     "attention_mask": ((1, "L"), (16, "L"), (64, "L"))},
}
WORKSPACE_BYTES = 1 << 30   # 1 GiB: fits Jetson Orin Nano


class EngineBuildError(ModelError):
    """TensorRT could not parse or build; the message carries the parser's errors."""


def gpu_name() -> str:
    from cuda.bindings import runtime as cudart
    err, props = cudart.cudaGetDeviceProperties(0)
    if err != cudart.cudaError_t.cudaSuccess:
        raise EngineBuildError(f"no CUDA device: {err}")
    return props.name.decode(errors="replace").strip("\x00")


def cache_key(onnx_path: Path, precision: str, profile: dict, gpu: str, trt_version: str) -> str:
    digest = hashlib.sha256(Path(onnx_path).read_bytes()).hexdigest()
    blob = json.dumps({"gpu": gpu, "trt": trt_version, "model": digest, "precision": precision,
                       "profile": profile}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _resolve(shape, dims: dict) -> tuple[int, ...]:
    return tuple(dims[d] if isinstance(d, str) else d for d in shape)


def onnx_to_engine(onnx_path: Path, engine_path: Path, precision: str, profile: dict, dims: dict) -> Path:
    import tensorrt as trt
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)      # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":            # the ONNX already carries QDQ scales (explicit quantization)
        config.set_flag(trt.BuilderFlag.INT8)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        opt.set_shape(name, _resolve(lo, dims), _resolve(mid, dims), _resolve(hi, dims))
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build {onnx_path} at {precision}")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    return engine_path


def bundle_to_engines(bundle_dir: Path, precision: str = "fp16", cache_dir: Path | None = None) -> list[Path]:
    """Build (or reuse from the cache) one engine per graph of a bundle."""
    import tensorrt as trt
    bundle_dir = Path(bundle_dir)
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    size, tokens = manifest["preprocessing"]["image_size"], manifest["preprocessing"]["max_tokens"]
    d_model = len(manifest["ood"]["mean"])
    dims = {"S": size, "P": (size // 32) ** 2, "D": d_model, "L": tokens,
            "M": manifest.get("model", {}).get("summary_tokens", 4)}
    cache_dir = Path(cache_dir or bundle_dir.parent / ".engine_cache")
    gpu, paths = gpu_name(), []
    for stem, profile in PROFILES.items():
        source = bundle_dir / (f"{stem}.int8.onnx" if precision == "int8" and stem != "text_encoder" else f"{stem}.onnx")
        key = cache_key(source, precision, profile, gpu, trt.__version__)
        engine = cache_dir / f"{stem}-{key}.engine"
        if not engine.exists():
            onnx_to_engine(source, engine, precision, profile, dims)
        paths.append(engine)
    (cache_dir / "engines.json").write_text(json.dumps({p.name.split("-")[0]: p.name for p in paths}, indent=1))
    return paths
