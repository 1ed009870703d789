"""Text-only preference pairs for the first stage: specific and consistent explanations
over vague, contradictory, incomplete or malformed ones. A frame is not needed to rank
these, which is exactly what the text-only shortcut proxy learns.

Chosen texts include no-defect explanations (as often as synthetic.sample_facts gives them)
so that this stage does not teach "no defect" wordings to score low: they also appear inside
the contradictory rejected texts."""
from __future__ import annotations

import numpy as np

from training.data import synthetic

VAGUE = ("something looks off", "maybe a problem somewhere", "not sure, could be anything",
         "there might be an issue", "looks weird", "defect?", "some kind of mark maybe")
EMPTY_ISH = ("...", "??", "-", "n/a", ". . .", "!!")


def _pick(options, rng):
    return options[rng.integers(len(options))]


def vague(chosen: str, rng) -> str:
    return _pick(VAGUE, rng)


def contradictory(chosen: str, rng) -> str:
    """Says there is no defect and names one in the same breath (training wordings only)."""
    defect = synthetic.sample_facts(rng, p_no_defect=0.0)
    no_defect = synthetic.describe(synthetic.NO_DEFECT, rng)
    return f"{no_defect}; {defect.severity} {defect.defect} in the {defect.location}"


def incomplete(chosen: str, rng) -> str:
    """A defect missing its location and/or severity (or its type)."""
    f = synthetic.sample_facts(rng, p_no_defect=0.0)
    return _pick((f"a {f.defect}", f"{f.severity} {f.defect}", f"{f.defect} somewhere on the part",
                  f"something {f.severity} in the {f.location}", f"defect at the {f.location}"), rng)


def malformed(chosen: str, rng) -> str:
    """Shuffled, truncated, stuttering or punctuation-only versions of the chosen text."""
    words = chosen.split()
    kind = rng.integers(4)
    if kind == 0:
        return " ".join(words[i] for i in rng.permutation(len(words)))
    if kind == 1:
        return " ".join(words[: max(1, len(words) // 3)])
    if kind == 2:
        return " ".join(w for w in words for _ in range(int(rng.integers(2, 4))))
    return _pick(EMPTY_ISH, rng)


REJECTION_KINDS = (vague, contradictory, incomplete, malformed)


def text_preference_pairs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    """n (chosen, rejected) pairs; chosen = synthetic.describe of random facts (training phrasings)."""
    pairs = []
    while len(pairs) < n:
        chosen = synthetic.describe(synthetic.sample_facts(rng), rng)
        rejected = _pick(REJECTION_KINDS, rng)(chosen, rng)
        if rejected.strip() and rejected != chosen:
            pairs.append((chosen, rejected))
    return pairs


def train_val_pairs(rng: np.random.Generator, n_train: int, n_val: int,
                    max_draws: int = 100_000) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """n_train training pairs and up to n_val validation pairs none of which is also a training pair.

    The pairs are drawn as text_preference_pairs(rng, n_train + n_val) draws them (the training
    pairs are its first n_train, whatever becomes of validation); validation then drops every
    pair that is also a training pair (the phrasings are few enough that about one in eight
    repeats one) and is topped up with further draws from rng that are not training pairs
    either, within max_draws tries."""
    pairs = text_preference_pairs(rng, n_train + n_val)
    train = pairs[:n_train]
    seen = set(train)
    val = [p for p in pairs[n_train:] if p not in seen]
    for _ in range(max_draws):
        if len(val) >= n_val:
            break
        extra = text_preference_pairs(rng, 1)[0]
        if extra not in seen:
            val.append(extra)
    return train, val
