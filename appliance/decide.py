"""From rewards to a verdict and, when the model is unsure, a flag with its reasons.

A frame that cannot show a part (all dark, all white, flat grey, noise: preprocess.frame_problem)
is always flagged, whatever the model says of it. Four more reasons to flag, each against a
runtime threshold (defaults in the bundle manifest):
  * low confidence: P(best beats runner-up) = sigmoid(r1 - r2) below `p_best`, or below
    `p_best_free_text` when the verdict is a candidate whose facts are unknown (free text),
    where the possible-defect check below cannot stand in for it
  * out of distribution: the frame's mean image feature is far from the training frames'
  * low image reliance: the rewards barely change when the frame is replaced by a blank
    one, so the ranking is being decided by the text alone
  * possible defect: the verdict says defect-free, but the candidates that name a defect
    together hold at least `p_defect` of the probability (softmax of the rewards). A missed
    defect costs more than a review, and it is where the model errs (off when the bundle or
    the config sets no `p_defect`, or when the candidates' facts are unknown)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.errors import ModelError


THRESHOLD_NAMES = ("p_best", "ood_distance", "image_reliance", "p_defect", "p_best_free_text")
OPTIONAL_THRESHOLDS = ("p_defect", "p_best_free_text")


@dataclass(frozen=True)
class Thresholds:
    p_best: float = 0.75
    ood_distance: float = 3.0
    image_reliance: float = 0.05
    p_defect: float | None = None
    p_best_free_text: float | None = None     # None: p_best for every verdict

    @classmethod
    def from_manifest(cls, data: dict, **overrides) -> "Thresholds":
        """The bundle's thresholds with a config's overrides. `p_defect: null` in the config
        turns the possible-defect check off; a `p_best` override applies to free-text verdicts
        too unless `p_best_free_text` is given as well."""
        values = {k: float(data[k]) for k in THRESHOLD_NAMES if data.get(k) is not None}
        if overrides.get("p_best") is not None and "p_best_free_text" not in overrides:
            overrides = {**overrides, "p_best_free_text": overrides["p_best"]}
        for k, v in overrides.items():
            if v is not None:
                values[k] = float(v)
            elif k in OPTIONAL_THRESHOLDS:
                values[k] = None
        return cls(**values)


# Shares of parts a station may send to its operator (appliance config `flag_budget`): for each,
# export chooses p_best and p_defect together on val so that the fewest defective cells escape
# while at most that share is flagged (export/decide_stats.budget_thresholds).
FLAG_BUDGETS = (0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40)


def budget_key(budget: float) -> str:
    return f"{budget:.2f}"


def manifest_thresholds(manifest: dict, views: str = "one", flag_budget: float | None = None) -> dict:
    """The bundle's thresholds for a station judging `views` (models.preprocess.VIEWS): export
    derives a set per views setting on val (`thresholds["by_views"]`); bundles exported before
    2026-12-07 carry one set, derived on the frame as it is, used for every setting. With a
    `flag_budget` (one of FLAG_BUDGETS), p_best and p_defect are the ones derived for it."""
    thresholds = manifest.get("thresholds", {})
    chosen = thresholds.get("by_views", {}).get(views, thresholds)
    if flag_budget is None:
        return chosen
    if "budgets" not in chosen:
        raise ModelError(f"bundle v{manifest.get('version')} carries no thresholds per flag budget (exported "
                         f"before flag budgets existed): remove flag_budget from the config, or re-derive its "
                         f"thresholds with `linejudge bundle recalibrate` at HQ")
    budgets = chosen["budgets"]
    picked = budgets.get(budget_key(flag_budget))
    if picked is None:
        offered = f"choose one of {', '.join(sorted(budgets))}" if budgets else "remove flag_budget from the config"
        raise ModelError(f"bundle v{manifest.get('version')} has no thresholds for flag_budget {flag_budget}: on val "
                         f"its other flag reasons (unusual frame, image barely matters) alone flag more than that "
                         f"share; {offered}")
    return {**chosen, "p_best": picked["p_best"], "p_defect": picked["p_defect"]}


@dataclass(frozen=True)
class Decision:
    verdict: str
    best_score: float
    p_best: float
    ranking: list[tuple[str, float]]     # best first
    flagged: bool
    reasons: list[str]
    ood_distance: float
    image_reliance: float


def outcome(flagged: bool, defective: bool | None) -> str:
    """What the line does with the part: "review" (an operator must look), "ng" (reject) or "ok"."""
    return "review" if flagged else "ng" if defective else "ok"


def sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def p_best(rewards: np.ndarray) -> float:
    """P(best beats runner-up) under Bradley-Terry; 1.0 with a single candidate."""
    if len(rewards) < 2:
        return 1.0
    top2 = np.sort(rewards)[-2:]
    return sigmoid(top2[1] - top2[0])


def p_defect(rewards: np.ndarray, defective: np.ndarray) -> float:
    """Probability (softmax of the rewards) that the right candidate is one naming a defect;
    `defective` marks those candidates (None = unknown counts as not naming one)."""
    p = np.exp(rewards - rewards.max())
    return float(p[np.array([bool(d) for d in defective])].sum() / p.sum())


def frame_vector(patches: np.ndarray) -> np.ndarray:
    """(P,d) or (B,P,d) patch features -> mean feature per frame."""
    return patches.mean(axis=-2)


def ood_distance(vector: np.ndarray, ood: dict) -> float:
    """RMS z-score of the frame's mean feature against the training frames' statistics."""
    mean, std = np.asarray(ood["mean"], np.float32), np.asarray(ood["std"], np.float32)
    return float(np.sqrt(np.mean(((vector - mean) / (std + 1e-6)) ** 2)))


def image_reliance(rewards: np.ndarray, blank_rewards: np.ndarray) -> float:
    """How much the frame moves the rewards relative to each other (0 = not at all)."""
    if len(rewards) < 2:
        return 1.0
    return float(np.std(rewards - blank_rewards) / (np.std(rewards) + 1e-6))


def decide(texts: list[str], rewards: np.ndarray, blank_rewards: np.ndarray, patches: np.ndarray,
           thresholds: Thresholds, ood: dict, defective: list[bool | None] | None = None,
           frame_problem: str | None = None) -> Decision:
    """`defective[i]`: whether candidate i names a defect (None: unknown, e.g. free text);
    `frame_problem`: why the frame cannot show a part (it is then always flagged)."""
    order = np.argsort(-rewards)
    ranking = [(texts[i], float(rewards[i])) for i in order]
    confidence = p_best(rewards)
    limit = _confidence_limit(thresholds, defective, int(order[0]))
    distance = ood_distance(frame_vector(patches), ood)
    reliance = image_reliance(rewards, blank_rewards)
    reasons = [frame_problem] if frame_problem else []
    if confidence < limit:
        reasons.append(f"low confidence: best beats runner-up with p={confidence:.2f} "
                       f"(threshold {limit:.2f})")
    if distance > thresholds.ood_distance:
        reasons.append(f"unusual frame: distance {distance:.2f} from training frames "
                       f"(threshold {thresholds.ood_distance:.2f})")
    if reliance < thresholds.image_reliance:
        reasons.append(f"image barely matters: reliance {reliance:.3f} "
                       f"(threshold {thresholds.image_reliance:.3f})")
    reasons += _possible_defect(rewards, int(order[0]), thresholds, defective)
    return Decision(ranking[0][0], ranking[0][1], confidence, ranking, bool(reasons), reasons,
                    distance, reliance)


def _confidence_limit(thresholds: Thresholds, defective, best: int) -> float:
    facts_known = defective is not None and defective[best] is not None
    if facts_known or thresholds.p_best_free_text is None:
        return thresholds.p_best
    return thresholds.p_best_free_text


def _possible_defect(rewards, best: int, thresholds: Thresholds, defective) -> list[str]:
    if thresholds.p_defect is None or defective is None or defective[best] is None or defective[best]:
        return []
    chance = p_defect(rewards, defective)
    if chance < thresholds.p_defect:
        return []
    return [f"possible defect: {chance:.0%} chance of a defect behind a defect-free verdict "
            f"(threshold {thresholds.p_defect:.0%})"]
