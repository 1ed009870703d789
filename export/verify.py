"""Accuracy of exported graphs, format against format (torch, ONNX fp32, ONNX INT8).

Works on the same candidate sets as training evaluation, through any ScoringBackend, so the
INT8 gate and the bundle's recorded metrics measure what the appliance will run.
"""
from __future__ import annotations

import numpy as np

from models.preprocess import PreprocessSpec, TextTokenizer, normalize


def backend_scores(backend, tokenizer: TextTokenizer, spec: PreprocessSpec, frames: np.ndarray,
                   texts: list[str], batch: int = 32) -> np.ndarray:
    """(N,S,S) uint8 frames x the same K texts -> (N,K) rewards."""
    return backend_outputs(backend, tokenizer, spec, frames, texts, batch)[1]


def backend_outputs(backend, tokenizer: TextTokenizer, spec: PreprocessSpec, frames: np.ndarray,
                    texts: list[str], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(N,S,S) uint8 frames x the same K texts -> patches (N,P,d) and rewards (N,K)."""
    ids, mask = tokenizer.encode(texts)
    features = backend.text_features(ids, mask)
    patches = np.concatenate([backend.image_features(normalize(frames[i:i + batch], spec))
                              for i in range(0, len(frames), batch)])
    rewards = np.concatenate([backend.rewards(patches[i:i + batch], features)
                              for i in range(0, len(patches), batch)])
    return patches, rewards


def backend_set_scores(backend, tokenizer, spec, data, seed: int = 0) -> np.ndarray:
    """(N,C) rewards for a candidate set (right candidate first), one frame at a time."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(len(data)):
        texts = data.texts(i, rng)
        rows.append(backend_scores(backend, tokenizer, spec, data.images[i:i + 1], texts)[0])
    return np.stack(rows)


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """Top-1 agreement and reward deltas between two formats' (N,K) rewards."""
    return {"top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "max_abs_reward_delta": float(np.abs(a - b).max()),
            "mean_abs_reward_delta": float(np.abs(a - b).mean())}

