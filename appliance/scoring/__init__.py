"""Scoring backends: the three exported graphs behind one small interface.

The appliance asks for a backend by name ("onnxruntime" or "tensorrt") and an ordered list
of execution providers; a backend reports the provider it really uses and refuses to start
on a different one unless fallback was allowed explicitly.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np


class ScoringBackend(Protocol):
    provider: str          # what is really running, e.g. "CPUExecutionProvider"

    def image_features(self, image: np.ndarray) -> np.ndarray:
        """(B,1,S,S) float32 -> (B,P,d) patch features."""

    def text_features(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(N,L) int32 ids/mask -> (N,M,d) text summary features."""

    def rewards(self, patches: np.ndarray, text_features: np.ndarray) -> np.ndarray:
        """(B,P,d) x (N,M,d) -> (B,N) rewards."""


def open_backend(bundle_dir, backend: str = "onnxruntime", providers: tuple[str, ...] = ("cpu",),
                 allow_fallback: bool = False, int8: bool = True, threads: int | None = None,
                 cache_dir=None) -> ScoringBackend:
    """cache_dir: where TensorRT engines are cached (a writable place: an installed bundle may
    lie on a read-only /opt); None = beside the bundle."""
    if backend == "onnxruntime":
        from appliance.scoring.onnx_backend import OnnxBackend
        return OnnxBackend(bundle_dir, providers, allow_fallback, int8=int8, threads=threads, cache_dir=cache_dir)
    if backend == "tensorrt":
        from appliance.scoring.tensorrt_backend import TensorRTBackend
        return TensorRTBackend(bundle_dir, cache_dir=cache_dir)
    from models.errors import ConfigError
    raise ConfigError(f"unknown scoring backend {backend!r}; use 'onnxruntime' or 'tensorrt'")
