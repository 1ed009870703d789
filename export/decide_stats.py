"""Calibrate the decide step's default thresholds and OOD statistics on the val split."""
from __future__ import annotations

import numpy as np

from appliance import decide
from appliance.preprocess import blank_input, normalize

CALIBRATION_TARGET = 0.97     # binary accuracy wanted among frames that are not flagged
MAX_FLAG_RATE = 0.30


def calibrate(backend, tokenizer, spec, val, catalog) -> dict:
    ids, mask = tokenizer.encode(catalog.displays)
    texts = backend.text_features(ids, mask)
    patches = np.concatenate([backend.image_features(normalize(val.images[i:i + 32], spec))
                              for i in range(0, len(val), 32)])
    rewards = np.concatenate([backend.rewards(patches[i:i + 32], texts) for i in range(0, len(patches), 32)])
    blank = backend.rewards(backend.image_features(blank_input(spec)), texts)[0]
    vectors = decide.frame_vector(patches)
    ood = {"mean": vectors.mean(0).tolist(), "std": vectors.std(0).tolist(), "frames": int(len(vectors))}
    distances = np.array([decide.ood_distance(v, ood) for v in vectors])
    reliance = np.array([decide.image_reliance(r, blank) for r in rewards])
    confidence = np.array([decide.p_best(r) for r in rewards])
    defective = np.array([bool(e.facts["defective"]) for e in catalog.entries])
    truth = np.array([bool(val.levels[i] >= 2) for i in range(len(val))])
    correct = defective[rewards.argmax(1)] == truth
    p_threshold = _p_best_threshold(confidence, correct)
    thresholds = {"p_best": p_threshold, "ood_distance": float(np.percentile(distances, 99) * 1.25),
                  "image_reliance": float(np.percentile(reliance, 1) * 0.8),
                  "calibration_target": CALIBRATION_TARGET,
                  "val_flag_rate": float((confidence < p_threshold).mean()),
                  "val_accuracy_unflagged": float(correct[confidence >= p_threshold].mean())
                  if (confidence >= p_threshold).any() else None}
    return {"thresholds": thresholds, "ood": ood}


def _p_best_threshold(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Smallest threshold whose unflagged frames reach the target, flagging at most 30 %."""
    for t in np.unique(np.round(confidence, 3)):
        kept = confidence >= t
        if (~kept).mean() > MAX_FLAG_RATE:
            break
        if kept.any() and correct[kept].mean() >= CALIBRATION_TARGET:
            return float(t)
    return float(np.quantile(confidence, MAX_FLAG_RATE))
