"""Calibrate the decide step's default thresholds and OOD statistics on the val split."""
from __future__ import annotations

import numpy as np

from appliance import decide
from appliance.preprocess import blank_input, normalize

CALIBRATION_TARGET = 0.97     # binary accuracy wanted among frames that are not flagged
MAX_FLAG_RATE = 0.30
MAX_FLAG_RATE_WITH_DEFECTS = 0.40   # "possible defect" flags may add up to 10 points of reviews


def catalog_outputs(backend, tokenizer, spec, images: np.ndarray, catalog):
    """What decide() reads for each frame against the whole catalog: patches (N,P,d),
    rewards (N,K), and the blank frame's rewards (K,)."""
    ids, mask = tokenizer.encode(catalog.displays)
    texts = backend.text_features(ids, mask)
    patches = np.concatenate([backend.image_features(normalize(images[i:i + 32], spec))
                              for i in range(0, len(images), 32)])
    rewards = np.concatenate([backend.rewards(patches[i:i + 32], texts) for i in range(0, len(patches), 32)])
    blank = backend.rewards(backend.image_features(blank_input(spec)), texts)[0]
    return patches, rewards, blank


def calibrate(backend, tokenizer, spec, val, catalog) -> dict:
    patches, rewards, blank = catalog_outputs(backend, tokenizer, spec, val.images, catalog)
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
    thresholds.update(_possible_defect_stats(rewards, blank, patches, defective, truth, catalog, thresholds, ood))
    return {"thresholds": thresholds, "ood": ood}


def _possible_defect_stats(rewards, blank, patches, defective, truth, catalog, thresholds, ood) -> dict:
    """The `p_defect` threshold that catches the most missed defects while every reason
    together flags at most 40 % of val frames, with what it costs and catches on val."""
    base = decide.Thresholds.from_manifest(thresholds)
    flagged = np.array([decide.decide(catalog.displays, r, blank, p, base, ood).flagged
                        for r, p in zip(rewards, patches)])
    chance = np.array([decide.p_defect(r, defective) for r in rewards])
    called = defective[rewards.argmax(1)]
    threshold = None
    for t in np.unique(np.round(chance[~called], 3)):
        if (flagged | (~called & (chance >= t))).mean() <= MAX_FLAG_RATE_WITH_DEFECTS:
            threshold = float(t)
            break
    if threshold is not None:
        flagged = flagged | (~called & (chance >= threshold))
    escaped = truth & ~called & ~flagged
    return {"p_defect": threshold, "val_flag_rate_all_reasons": float(flagged.mean()),
            "val_defective_escape_rate": float(escaped.sum() / max(truth.sum(), 1))}


def _p_best_threshold(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Smallest threshold whose unflagged frames reach the target, flagging at most 30 %."""
    for t in np.unique(np.round(confidence, 3)):
        kept = confidence >= t
        if (~kept).mean() > MAX_FLAG_RATE:
            break
        if kept.any() and correct[kept].mean() >= CALIBRATION_TARGET:
            return float(t)
    return float(np.quantile(confidence, MAX_FLAG_RATE))
