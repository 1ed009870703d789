"""The evaluation metrics, shared by the checkpoint eval (`training/evaluate.py`, torch) and the
bundle eval (`export/evaluate_bundle.py`, the exported graphs through a ScoringBackend).

Nothing here knows what produced the rewards: ELPV figures take (N, K) catalog rewards, and the
candidate-set figures take a `score_sets` callable, so torch and ONNX are judged by one code
path. No torch import.

    score_sets(data, heldout=False, swap=False, blank=False) -> (N, C) rewards, right candidate first
      heldout: held-out phrasings of the same facts; swap: frame i scored with the texts of
      frame i (drawn as usual) but the image of frame i-1; blank: a mid-gray frame instead.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from models.common import is_whole
from models.errors import ConfigError
from training.data import elpv, synthetic
from training.data.batches import elpv_set, synthetic_set

SYNTHETIC_EVAL_SEED = {"val": 1001, "test": 2002}
SYNTHETIC_EVAL_FRAMES = 400

ScoreSets = Callable[..., np.ndarray]


def check_limit(limit) -> None:
    """None (every frame) or a whole number >= 1: a limit of 0 or below would evaluate nothing."""
    if limit is not None and (not is_whole(limit) or limit < 1):
        raise ConfigError(f"the evaluation limit must be a whole number of at least 1 (or left out for "
                          f"every frame), e.g. --limit 200; got {limit!r}")


def eval_sets(split: str, image_size: int, limit: int | None = None, seed: int = 0):
    """The ELPV split and the fixed synthetic set (on that split's defect-free cells) that every
    evaluation scores: (elpv_data, synthetic_data)."""
    data = elpv_set(split, image_size, limit=limit, seed=seed)
    backgrounds = data.images[np.asarray(data.levels) == 0][:100]
    n_syn = min(limit or SYNTHETIC_EVAL_FRAMES, SYNTHETIC_EVAL_FRAMES)
    syn = synthetic_set(f"synthetic-{split}", n_syn, image_size, SYNTHETIC_EVAL_SEED[split], 0.5, backgrounds)
    return data, syn


def right_first(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(N, K) rewards against a catalog and each frame's right entry -> the rewards with the
    right entry moved first (the order pair_correct and oriented_pairs read)."""
    return np.stack([np.concatenate([[s[t]], np.delete(s, t)]) for s, t in zip(scores, truth)])


def pair_correct(r: np.ndarray) -> np.ndarray:
    """(N, C) rewards with the right one first -> (N, C-1) booleans."""
    return r[:, :1] > r[:, 1:]


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    edges = np.linspace(0, 1, bins + 1)
    table, total = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (probs >= lo) & (probs < hi if hi < 1 else probs <= hi)
        if sel.any():
            conf, acc = float(probs[sel].mean()), float(labels[sel].mean())
            total += sel.mean() * abs(conf - acc)
            table.append({"lo": float(lo), "hi": float(hi), "confidence": conf, "accuracy": acc,
                          "count": int(sel.sum())})
    return float(total), table


def oriented_pairs(r: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Every (right, wrong) pair in random order -> P(first wins), first-is-right."""
    diff = (r[:, :1] - r[:, 1:]).ravel()
    flip = rng.random(diff.shape) < 0.5
    return 1 / (1 + np.exp(-np.where(flip, -diff, diff))), (~flip).astype(float)


# ------------------------------------------------------------------ ELPV
def elpv_metrics(scores: np.ndarray, data) -> tuple[dict, np.ndarray]:
    """(N, K) rewards against the whole catalog -> ELPV metrics, and the rewards reordered with
    each frame's right entry first (for pairwise accuracy)."""
    cat = data.catalog
    levels = np.array([round(e.facts["level"] * 3) for e in cat.entries])
    types = np.array([e.facts["type"] for e in cat.entries])
    defective = np.array([bool(e.facts["defective"]) for e in cat.entries])
    probs = np.exp(scores - scores.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    p_defective = probs[:, defective].sum(1)
    best = scores.argmax(1)
    true_level, true_type = np.asarray(data.levels), np.asarray(data.types)
    true_bin = np.array([elpv.LEVELS[l] >= 0.5 for l in true_level])
    pred_bin, pred_level = p_defective >= 0.5, levels[best]
    truth_idx = np.array([data.truth(i) for i in range(len(data))])
    m = {"elpv_frames": len(data),
         "elpv_binary_accuracy": float((pred_bin == true_bin).mean()),
         "elpv_level_accuracy": float((pred_level == true_level).mean()),
         "elpv_type_accuracy": float((types[best] == true_type).mean()),
         "elpv_top1_accuracy": float((best == truth_idx).mean())}
    for t in ("mono", "poly"):
        sel = true_type == t
        if sel.any():
            m[f"elpv_binary_accuracy_{t}"] = float((pred_bin[sel] == true_bin[sel]).mean())
            m[f"elpv_level_accuracy_{t}"] = float((pred_level[sel] == true_level[sel]).mean())
    m["confusion_level"] = _confusion(true_level, pred_level, 4).tolist()
    m["confusion_binary"] = _confusion(true_bin.astype(int), pred_bin.astype(int), 2).tolist()
    return m, right_first(scores, truth_idx)


def _confusion(truth, pred, k) -> np.ndarray:
    out = np.zeros((k, k), int)
    np.add.at(out, (truth, pred), 1)
    return out


# ------------------------------------------------------------------ candidate sets
def set_metrics(score_sets: ScoreSets, syn, data, el_ordered: np.ndarray) -> tuple[dict, np.ndarray]:
    """Pairwise accuracy (ELPV + synthetic), image reliance (swapped and blank frames), per-fact
    synthetic accuracy and seen vs held-out phrasings, from one model's `score_sets`.
    Returns the metrics and the synthetic rewards (right first, for calibration)."""
    syn_r = score_sets(syn)
    syn_pairs, el_pairs = pair_correct(syn_r), pair_correct(el_ordered)
    m = {"pairwise_accuracy": float(np.concatenate([syn_pairs.ravel(), el_pairs.ravel()]).mean()),
         "elpv_pairwise_accuracy": float(el_pairs.mean()),
         "synthetic_pairwise_accuracy": float(syn_pairs.mean()),
         "best_of_n_accuracy": float(syn_pairs.all(1).mean()),
         "best_of_n_candidates": int(syn_r.shape[1]),
         "image_swap_accuracy": float(pair_correct(score_sets(syn, swap=True)).mean()),
         "blank_frame_accuracy": float(pair_correct(score_sets(syn, blank=True)).mean())}
    m.update(synthetic_by_fact(syn, syn_pairs))
    m.update(phrasing_metrics(score_sets, syn, data, syn_pairs))
    return m, syn_r


def synthetic_by_fact(syn, correct: np.ndarray) -> dict:
    """Synthetic pairwise accuracy split by the fact the hard negative changed: which facts the
    model reads from the frame and which it misses."""
    kinds = np.array([[synthetic.changed_fact(f, n) for n in negs] for f, negs in zip(syn.facts, syn.negatives)])
    return {f"synthetic_pairwise_accuracy_{kind}": float(correct[kinds == kind].mean())
            for kind in synthetic.FACT_KINDS if (kinds == kind).any()}


def phrasing_metrics(score_sets: ScoreSets, syn, data, syn_pairs: np.ndarray | None = None) -> dict:
    """Seen vs held-out phrasings on the same frames and the same wrong facts."""
    syn_seen = pair_correct(score_sets(syn)) if syn_pairs is None else syn_pairs
    seen = np.concatenate([syn_seen.ravel(), pair_correct(score_sets(data)).ravel()])
    held = np.concatenate([pair_correct(score_sets(syn, heldout=True)).ravel(),
                           pair_correct(score_sets(data, heldout=True)).ravel()])
    return {"seen_phrasing_accuracy": float(seen.mean()), "heldout_phrasing_accuracy": float(held.mean()),
            "heldout_phrasing_gap": float(seen.mean() - held.mean())}
