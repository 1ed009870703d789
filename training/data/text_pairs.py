"""Text-only preference pairs for the first stage: specific and consistent explanations
over vague, contradictory, incomplete or malformed ones. A frame is not needed to rank
these, which is exactly what the text-only shortcut proxy learns."""
from __future__ import annotations

import numpy as np

from training.data import synthetic

VAGUE = ("something looks off", "maybe a problem somewhere", "not sure, could be anything",
         "there might be an issue", "looks weird", "defect?", "some kind of mark maybe")


def _contradictory(facts, rng) -> str:
    no_defect = synthetic.NO_DEFECT_PHRASINGS[rng.integers(len(synthetic.NO_DEFECT_PHRASINGS))]
    return f"{no_defect}; {facts.severity} {facts.defect} in the {facts.location}"


def _incomplete(facts, rng) -> str:
    return [f"a {facts.defect}", f"something {facts.severity} in the {facts.location}",
            f"defect at the {facts.location}"][rng.integers(3)]


def _malformed(text: str, rng) -> str:
    words = text.split()
    kind = rng.integers(4)
    if kind == 0:
        rng.shuffle(words)
        return " ".join(words)
    if kind == 1:
        return " ".join(words[: max(1, len(words) // 3)])
    if kind == 2:
        return " ".join(w for w in words for _ in range(2))
    return "... ?? " + words[0] + " !!"


def text_preference_pairs(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    pairs = []
    while len(pairs) < n:
        facts = synthetic.sample_facts(rng, p_no_defect=0.0)
        chosen = synthetic.describe(facts, rng)
        kind = rng.integers(4)
        if kind == 0:
            rejected = VAGUE[rng.integers(len(VAGUE))]
        elif kind == 1:
            rejected = _contradictory(facts, rng)
        elif kind == 2:
            rejected = _incomplete(facts, rng)
        else:
            rejected = _malformed(chosen, rng)
        if rejected.strip() and rejected != chosen:
            pairs.append((chosen, rejected))
    return pairs
