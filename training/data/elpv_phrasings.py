"""Generated phrasings of the ELPV catalog's facts (defect level x cell type), for training.

The catalog gives four training texts per entry, all in one style; a model trained on those
alone reads an explanation worded another way (one word, another order, shop-floor words)
about as well as chance (issue 18: 11.6 points below the catalog on the first outside set).
These are composed from the facts instead: a verdict phrase for the level, a name for the cell
type, an optional detail, in one of several orders and lengths. Written after the first outside
set (training/data/outside_phrasings.yaml) had been seen, so that set no longer measures
wording never met in training; training/data/outside_phrasings_unseen.yaml was written by
someone who saw neither this file nor the catalog, and is the honest measure.
"""
from __future__ import annotations

import itertools

import numpy as np

TYPE_NAMES = {
    "mono": ("monocrystalline", "mono", "mono-crystalline", "single-crystal", "mono-Si", "monocrystalline silicon",
             "single crystal silicon", "mono c-Si"),
    "poly": ("polycrystalline", "poly", "poly-crystalline", "multicrystalline", "multi-crystalline", "poly-Si",
             "mc-Si", "multicrystalline silicon"),
}
PART_NAMES = ("cell", "solar cell", "PV cell", "wafer", "cell image", "EL image", "sample", "unit")

# Level 0, 1/3, 2/3, 1: what an inspector says of the cell, from sure-good to sure-bad.
VERDICTS = (
    ("no defect", "defect-free", "good", "OK", "pass", "passes", "accept", "fine", "healthy", "works",
     "fully functional", "no damage found", "nothing wrong", "all good", "clean", "in spec", "keep"),
    ("probably fine", "most likely OK", "minor blemish, probably harmless", "acceptable with a small doubt",
     "borderline good", "faint spot, likely cosmetic", "slight irregularity, keep", "probably passes",
     "small shadow, not a real defect", "OK-ish", "looks acceptable, minor doubt", "likely functional"),
    ("probably defective", "likely cracked", "suspected microcrack", "possible crack", "looks damaged, not sure",
     "probably bad", "questionable, likely a crack", "suspicious dark line", "likely fail", "doubtful, pull it",
     "probable fracture", "likely reject"),
    ("defective", "cracked", "broken", "reject", "scrap", "fail", "bad", "damaged", "dead area", "shattered",
     "clearly cracked", "NG", "not usable", "fractured", "definitely defective"),
)
DETAILS = (
    ("uniform brightness", "evenly lit", "no dark regions", "no cracks", "emission even across the cell",
     "no inactive areas", "bright everywhere"),
    ("a faint mark", "one small dim spot", "a slight shadow", "a tiny irregularity", "a light smudge",
     "a barely visible line"),
    ("a dark line", "a thin dark streak", "what looks like a hairline crack", "a partly dark region",
     "a suspicious seam", "a dim crack-like trace"),
    ("cracks and dark areas", "a large dead region", "inactive fragments", "a black broken-off piece",
     "a crack through the cell", "disconnected dark parts"),
)
TEMPLATES = (
    "{verdict}",
    "{verdict}, {type}",
    "{type} {part}: {verdict}",
    "{verdict}: {type} {part}",
    "{type} {part}, {verdict}",
    "{type} {part} with {detail}, {verdict}",
    "{verdict}. {type} {part}, {detail}.",
    "{part} ({type}) - {verdict}",
    "{detail} on this {type} {part}; {verdict}",
    "{verdict} ({type}, {detail})",
)


def _pick(options, rng: np.random.Generator):
    return options[int(rng.integers(len(options)))]


def every_phrasing(level: int, cell_type: str):
    """Every text phrase() can return for this level and cell type (for checks, not training)."""
    for template, verdict, type_name, part, detail in itertools.product(
            TEMPLATES, VERDICTS[level], TYPE_NAMES[cell_type], PART_NAMES, DETAILS[level]):
        text = template.format(verdict=verdict, type=type_name, part=part, detail=detail)
        yield from {text, text.lower(), text[0].upper() + text[1:]}


def phrase(level: int, cell_type: str, rng: np.random.Generator) -> str:
    """One phrasing stating defect level `level` (0..3) of a `cell_type` ("mono"/"poly") cell."""
    text = _pick(TEMPLATES, rng).format(verdict=_pick(VERDICTS[level], rng), type=_pick(TYPE_NAMES[cell_type], rng),
                                        part=_pick(PART_NAMES, rng), detail=_pick(DETAILS[level], rng))
    case = rng.random()
    if case < 0.15:
        return text.lower()
    if case < 0.25:
        return text[0].upper() + text[1:]
    return text


POOL_PER_ENTRY = 200


def pool(seed: int, per_entry: int = POOL_PER_ENTRY) -> dict[tuple[int, str], list[str]]:
    """A fixed set of distinct phrasings per (level, cell type) for one training run: varied enough
    (200 against the catalog's 4), and few enough that the teacher's frozen MiniLM encodes each
    once (its states are cached per text) instead of once per draw."""
    rng = np.random.default_rng(seed)
    out = {}
    for level in range(len(VERDICTS)):
        for cell_type in TYPE_NAMES:
            texts: dict[str, None] = {}
            while len(texts) < per_entry:
                texts[phrase(level, cell_type, rng)] = None
            out[(level, cell_type)] = list(texts)
    return out
