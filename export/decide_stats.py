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
    grid = threshold_grid(confidence, chance, called, truth, other, p_threshold)
    thresholds.update(joint_thresholds(confidence, chance, called, truth, other, p_threshold, grid=grid))
    thresholds["budgets"] = budget_thresholds(confidence, chance, called, truth, other, p_threshold, grid=grid)
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


def joint_thresholds(confidence, chance, called, truth, other_flags, p_best_alone: float,
                     max_flag_rate: float = MAX_FLAG_RATE_WITH_DEFECTS, grid: dict | None = None) -> dict:
    """Choose `p_defect` and `p_best` together: the fewest defective cells escaping while every
    reason together flags at most `max_flag_rate` of frames (40 %); ties go to fewer flags, then to
    the more accurate unflagged verdicts, then to the higher `p_best`, then to the lower `p_defect`.
    `p_best` never rises above its own calibration, which stays in force for free-text verdicts
    (`p_best_free_text`: no facts, so no possible-defect check). On the shipped bundle a
    possible-defect flag catches a missed defect far more often than a low-confidence one.
    p_defect None: the possible-defect check off, chosen where it would add flags and catch
    nothing (before 2026-12-07 the search had no such option and flagged those frames anyway);
    {"p_defect": None} alone when nothing fits. `grid`: threshold_grid's, if already made."""
    grid = grid or threshold_grid(confidence, chance, called, truth, other_flags, p_best_alone)
    best = _best_within(grid, max_flag_rate)
    if best is None:
        return {"p_defect": None}
    return {"p_best_free_text": float(p_best_alone), "p_best": best["p_best"], "p_defect": best["p_defect"],
            "val_flag_rate_all_reasons": best["flag_rate"],
            "val_accuracy_unflagged_all_reasons": best["unflagged_binary_accuracy"],
            "val_defective_escape_rate": best["defective_escape_rate"]}


def budget_thresholds(confidence, chance, called, truth, other_flags, p_best_alone: float,
                      grid: dict | None = None) -> dict:
    """For each flag budget (decide.FLAG_BUDGETS, keyed "0.25"): the p_best and p_defect that let
    the fewest defective cells escape on val with at most that share flagged (as joint_thresholds
    chooses), and what val saw. Budgets the other reasons alone already exceed are left out."""
    grid = grid or threshold_grid(confidence, chance, called, truth, other_flags, p_best_alone)
    budgets = {}
    for budget in decide.FLAG_BUDGETS:
        best = _best_within(grid, budget)
        if best is not None:
            budgets[decide.budget_key(budget)] = {
                "p_best": best["p_best"], "p_defect": best["p_defect"], "val_flag_rate": best["flag_rate"],
                "val_defective_escape_rate": best["defective_escape_rate"]}
    return budgets


def threshold_grid(confidence, chance, called, truth, other_flags, p_best_alone: float) -> dict:
    """Every candidate pair (p_best up to its own calibration, p_defect at each missed-looking
    frame's chance, or inf: no possible-defect check) with what it does on these frames: arrays
    of equal length (the flags are held as pairs x frames booleans: about 20 MB at val's 263)."""
    p_bests = np.unique(np.r_[0.5, np.round(confidence[confidence < p_best_alone], 3), p_best_alone])
    p_defects = np.r_[np.unique(np.round(chance[~called], 3)), np.inf]
    pb, pd = (a.ravel() for a in np.meshgrid(p_bests, p_defects, indexing="ij"))
    flagged = other_flags | (confidence < pb[:, None]) | (~called & (chance >= pd[:, None]))
    passed, right, n_defective = ~flagged, called == truth, max(truth.sum(), 1)
    kept = passed.sum(1)
    return {"p_best": pb, "p_defect": pd, "flag_rate": flagged.mean(1),
            "defective_escape_rate": (truth & ~called & passed).sum(1) / n_defective,
            "unflagged_binary_accuracy": np.where(kept > 0, (right & passed).sum(1) / np.maximum(kept, 1), np.nan)}


def _best_within(grid: dict, max_flag_rate: float) -> dict | None:
    """The grid row with the fewest escapes within the flag budget (ties as in joint_thresholds)."""
    fits = np.flatnonzero(grid["flag_rate"] <= max_flag_rate)
    if not len(fits):
        return None
    accuracy = np.nan_to_num(grid["unflagged_binary_accuracy"][fits], nan=0.0)
    # np.lexsort sorts by the last key first; every key ascending, so the best row comes first
    order = np.lexsort((grid["p_defect"][fits], -grid["p_best"][fits], -accuracy,
                        grid["flag_rate"][fits], grid["defective_escape_rate"][fits]))
    row = fits[order[0]]
    accuracy = grid["unflagged_binary_accuracy"][row]
    p_defect = float(grid["p_defect"][row])
    return {"p_best": float(grid["p_best"][row]), "p_defect": p_defect if np.isfinite(p_defect) else None,
            "flag_rate": float(grid["flag_rate"][row]),
            "defective_escape_rate": float(grid["defective_escape_rate"][row]),
            "unflagged_binary_accuracy": None if np.isnan(accuracy) else float(accuracy)}


def _p_best_threshold(confidence: np.ndarray, correct: np.ndarray) -> float:
    """Smallest threshold whose unflagged frames reach the target, flagging at most 30 %."""
    for t in np.unique(np.round(confidence, 3)):
        kept = confidence >= t
        if (~kept).mean() > MAX_FLAG_RATE:
            break
        if kept.any() and correct[kept].mean() >= CALIBRATION_TARGET:
            return float(t)
    return float(np.quantile(confidence, MAX_FLAG_RATE))
