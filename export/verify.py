"""Accuracy of exported graphs, format against format (torch, ONNX fp32, ONNX INT8).

Works on the same candidate sets as training evaluation, through any ScoringBackend, so the
INT8 gate and the bundle's recorded metrics measure what the appliance will run.
"""
from __future__ import annotations

import numpy as np

from models.preprocess import VIEWS, PreprocessSpec, TextTokenizer, normalize


def backend_scores(backend, tokenizer: TextTokenizer, spec: PreprocessSpec, frames: np.ndarray,
                   texts: list[str], batch: int = 32) -> np.ndarray:
    """(N,S,S) uint8 frames x the same K texts -> (N,K) rewards."""
    return backend_outputs(backend, tokenizer, spec, frames, texts, batch)[1]


def backend_outputs(backend, tokenizer: TextTokenizer, spec: PreprocessSpec, frames: np.ndarray,
                    texts: list[str], batch: int = 32, views: str = "one") -> tuple[np.ndarray, np.ndarray]:
    """(N,S,S) uint8 frames x the same K texts -> patches (N,P,d) and rewards (N,K). `views` (a
    models.preprocess.VIEWS name) as the appliance's config: the rewards are averaged over the
    views of each frame, the patches are the first view's (what the appliance's checks read)."""
    ids, mask = tokenizer.encode(texts)
    features = backend.text_features(ids, mask)
    per_view = []
    for view in VIEWS[views]:
        seen = np.stack([np.ascontiguousarray(view(f)) for f in frames])
        patches = np.concatenate([backend.image_features(normalize(seen[i:i + batch], spec))
                                  for i in range(0, len(seen), batch)])
        rewards = np.concatenate([backend.rewards(patches[i:i + batch], features)
                                  for i in range(0, len(patches), batch)])
        per_view.append((patches, rewards))
    return per_view[0][0], np.mean([r for _, r in per_view], axis=0)


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

