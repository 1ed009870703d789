"""Calibrate the decide step's default thresholds and OOD statistics on the val split."""
from __future__ import annotations

import numpy as np

from appliance import decide
from models.errors import ConfigError
from export import verify
from models.preprocess import VIEWS

CALIBRATION_TARGET = 0.97     # binary accuracy wanted among frames that are not flagged
MAX_FLAG_RATE = 0.30
MAX_FLAG_RATE_WITH_DEFECTS = 0.40   # "possible defect" flags may add up to 10 points of reviews


def catalog_outputs(backend, tokenizer, spec, images: np.ndarray, catalog, views: str = "one"):
    """What decide() reads for each frame against the whole catalog: patches (N,P,d),
    rewards (N,K) averaged over `views` as on the appliance, and the blank frame's rewards (K,)."""
    patches, rewards = verify.backend_outputs(backend, tokenizer, spec, images, catalog.displays, views=views)
    blank = np.full((1, spec.image_size, spec.image_size), 128, np.uint8)   # as models.preprocess.blank_input
    return patches, rewards, verify.backend_scores(backend, tokenizer, spec, blank, catalog.displays)[0]


def calibrate(backend, tokenizer, spec, val, catalog) -> dict:
    """Thresholds and OOD statistics from val. The thresholds are derived once per appliance
    `views` setting (a station that averages two views is more confident, so the same thresholds
    would flag other frames): the frame as it is in `thresholds`, the others in
    `thresholds["by_views"]`, which the appliance picks by its config (decide.manifest_thresholds)."""
    patches, rewards, blank = catalog_outputs(backend, tokenizer, spec, val.images, catalog)
    vectors = decide.frame_vector(patches)
    ood = {"mean": vectors.mean(0).tolist(), "std": vectors.std(0).tolist(), "frames": int(len(vectors))}
    thresholds = _thresholds(patches, rewards, blank, ood, val, catalog)
    thresholds["by_views"] = {}
    for views in VIEWS:
        if views != "one":
            outputs = catalog_outputs(backend, tokenizer, spec, val.images, catalog, views)
            thresholds["by_views"][views] = _thresholds(*outputs, ood, val, catalog)
    return {"thresholds": thresholds, "ood": ood}


def _thresholds(patches, rewards, blank, ood: dict, val, catalog) -> dict:
    vectors = decide.frame_vector(patches)
    distances = np.array([decide.ood_distance(v, ood) for v in vectors])
    reliance = np.array([decide.image_reliance(r, blank) for r in rewards])
    confidence = np.array([decide.p_best(r) for r in rewards])
    defective = catalog_defective(catalog)
    truth = np.array([bool(val.levels[i] >= 2) for i in range(len(val))])
    called = defective[rewards.argmax(1)]
    correct = called == truth
    p_threshold = _p_best_threshold(confidence, correct)
    thresholds = {"p_best": p_threshold, "ood_distance": float(np.percentile(distances, 99) * 1.25),
                  "image_reliance": float(np.percentile(reliance, 1) * 0.8),
                  "calibration_target": CALIBRATION_TARGET,
                  "val_flag_rate_low_confidence_alone": float((confidence < p_threshold).mean()),
                  "val_accuracy_unflagged_low_confidence_alone": float(correct[confidence >= p_threshold].mean())
                  if (confidence >= p_threshold).any() else None}
    other = (distances > thresholds["ood_distance"]) | (reliance < thresholds["image_reliance"])
    chance = np.array([decide.p_defect(r, defective) for r in rewards])
    thresholds.update(joint_thresholds(confidence, chance, called, truth, other, p_threshold))
    return thresholds


def catalog_defective(catalog) -> np.ndarray:
    facts = catalog.defective
    if any(d is None for d in facts):
        missing = [e.id for e, d in zip(catalog.entries, facts) if d is None]
        raise ConfigError(f"catalog entries {missing[:5]} have no facts.defective (true/false); "
                          f"calibration and evaluation need it on every entry")
    return np.array(facts, bool)


def flag_outcomes(called: np.ndarray, truth: np.ndarray, flagged: np.ndarray) -> dict:
    """What the line sees: flags, accuracy of the verdicts that pass, and defective cells that
    pass with a defect-free verdict (escapes) or defect-free ones that pass called defective."""
    passed = ~flagged
    return {"flag_rate": float(flagged.mean()),
            "unflagged_binary_accuracy": float((called == truth)[passed].mean()) if passed.any() else None,
            "defective_missed_rate": float((truth & ~called).sum() / max(truth.sum(), 1)),
            "defective_escape_rate": float((truth & ~called & passed).sum() / max(truth.sum(), 1)),
            "functional_false_alarm_rate": float((~truth & called & passed).sum() / max((~truth).sum(), 1))}


def joint_thresholds(confidence, chance, called, truth, other_flags, p_best_alone: float) -> dict:
    """Choose `p_defect` and `p_best` together: the fewest defective cells escaping while every
    reason together flags at most 40 % of frames; ties go to fewer flags, then to the more
    accurate unflagged verdicts, then to the higher `p_best`. `p_best` never rises above its own
    calibration, which stays in force for free-text verdicts (`p_best_free_text`: no facts, so
    no possible-defect check). On the shipped bundle a possible-defect flag catches a missed
    defect far more often than a low-confidence one. {"p_defect": None} when nothing fits."""
    best = None
    for p_best in np.unique(np.r_[0.5, np.round(confidence[confidence < p_best_alone], 3), p_best_alone]):
        low = other_flags | (confidence < p_best)
        for p_defect in np.unique(np.round(chance[~called], 3)):
            outcome = flag_outcomes(called, truth, low | (~called & (chance >= p_defect)))
            if outcome["flag_rate"] > MAX_FLAG_RATE_WITH_DEFECTS:
                continue
            key = (-outcome["defective_escape_rate"], -outcome["flag_rate"],
                   outcome["unflagged_binary_accuracy"] or 0.0, p_best)
            if best is None or key > best[0]:
                best = (key, float(p_best), float(p_defect), outcome)
    if best is None:
        return {"p_defect": None}
    _, p_best, p_defect, outcome = best
    return {"p_best_free_text": float(p_best_alone), "p_best": p_best, "p_defect": p_defect,
            "val_flag_rate_all_reasons": outcome["flag_rate"],
            "val_accuracy_unflagged_all_reasons": outcome["unflagged_binary_accuracy"],
            "val_defective_escape_rate": outcome["defective_escape_rate"]}


def _p_best_threshold(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Smallest threshold whose unflagged frames reach the target, flagging at most 30 %."""
    for t in np.unique(np.round(confidence, 3)):
        kept = confidence >= t
        if (~kept).mean() > MAX_FLAG_RATE:
            break
        if kept.any() and correct[kept].mean() >= CALIBRATION_TARGET:
            return float(t)
    return float(np.quantile(confidence, MAX_FLAG_RATE))
