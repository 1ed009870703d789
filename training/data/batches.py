"""Candidate-set datasets and batches shared by every stage and by evaluation.

A sample is one frame with C candidate explanations; candidate 0 is the right one (the
chosen side of C-1 preference pairs). ELPV frames get one phrasing of every catalog entry
(C = 8); synthetic frames get the truth and hard negatives that differ in one fact (C = 4 for
evaluation; training may use all 16 one-fact changes, C = 17: many more pairs per encoded frame).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from models.catalog import Catalog, load_catalog, CATALOG_DIR
from training.data import elpv, elpv_phrasings, synthetic

EL_CATALOG = CATALOG_DIR / "el_solar.yaml"
TYPES = ("mono", "poly")


def el_catalog() -> Catalog:
    return load_catalog(EL_CATALOG)


def entry_index(catalog: Catalog, level: int, cell_type: str) -> int:
    for i, entry in enumerate(catalog.entries):
        if round(entry.facts["level"] * 3) == level and entry.facts["type"] == cell_type:
            return i
    raise KeyError((level, cell_type))


@dataclass
class CandidateSet:
    """Frames (N,S,S) uint8 with their candidates; `texts(i, rng)` picks phrasings."""
    name: str
    images: np.ndarray
    ids: list[str]
    flippable = True                # synthetic frames are not: a flip moves the defect
    quarter_turns = False           # also turn by a random multiple of 90 degrees (data.quarter_turns)
    camera_changes = False          # also one random change a camera makes (data.camera_changes)

    def __len__(self) -> int:
        return len(self.images)

    def texts(self, i: int, rng: np.random.Generator, heldout: bool = False, display: bool = False) -> list[str]:
        raise NotImplementedError

    def fact_labels(self, idx: np.ndarray) -> np.ndarray | None:
        """(B, 3) type/location/severity classes where the frame's facts are known, else None."""
        return None

    def level_labels(self, idx: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """((B,) frame levels, (B, C) levels the candidates state) where known, else (None, None)."""
        return None, None

    def text_fact_labels(self, idx: np.ndarray, c: int) -> np.ndarray | None:
        """(B, C, 3) type/location/severity classes each candidate states (K_s: it states none
        of that fact), where known, else None."""
        return None


@dataclass
class ElpvSet(CandidateSet):
    levels: np.ndarray = None       # (N,) 0..3
    types: list[str] = None
    catalog: Catalog = None
    phrasings = 0.0                 # share of training texts composed from the facts (data.elpv_phrasings)
    phrasing_pool = None            # (level, cell type) -> phrasings drawn from (elpv_phrasings.pool)

    def truth(self, i: int) -> int:
        return entry_index(self.catalog, int(self.levels[i]), self.types[i])

    def order(self, i: int) -> list[int]:
        """Catalog entries in candidate order: the right entry first, then every other."""
        return [self.truth(i)] + [j for j in range(len(self.catalog.entries)) if j != self.truth(i)]

    def level_labels(self, idx):
        entry_levels = [round(e.facts["level"] * 3) for e in self.catalog.entries]
        stated = [[entry_levels[j] for j in self.order(int(i))] for i in idx]
        return np.asarray(self.levels)[idx].astype(np.int64), np.array(stated, np.int64)

    def text_fact_labels(self, idx, c):
        """A catalog entry of ELPV states no fact of a rendered defect."""
        return np.broadcast_to(np.array(synthetic.FACT_CLASSES, np.int64), (len(idx), c, 3)).copy()

    def use_phrasings(self, share: float, seed: int) -> None:
        """Draw `share` of the training texts from phrasings composed from the entries' facts."""
        self.phrasings = share
        self.phrasing_pool = elpv_phrasings.pool(seed) if share else None

    def texts(self, i, rng, heldout=False, display=False):
        """The right entry first, then every other entry, one phrasing each: a catalog text, or
        with probability `phrasings` (training only) one composed from the entry's facts."""
        out = []
        for j in self.order(i):
            entry = self.catalog.entries[j]
            if self.phrasings and not (heldout or display) and rng.random() < self.phrasings:
                pool = self.phrasing_pool[(round(entry.facts["level"] * 3), entry.facts["type"])]
            else:
                pool = entry.heldout if heldout else (entry.texts[:1] if display else entry.texts)
            out.append(pool[rng.integers(len(pool))])
        return out


@dataclass
class SyntheticSet(CandidateSet):
    facts: list = None
    negatives: list = None          # per frame: list of DefectFacts differing in one fact
    flippable = False

    def fact_labels(self, idx):
        return np.array([synthetic.fact_labels(self.facts[i]) for i in idx], np.int64)

    def text_fact_labels(self, idx, c):
        """The truth's facts first, then each hard negative's (the order of texts())."""
        return np.array([[synthetic.fact_labels(f) for f in [self.facts[i], *self.negatives[i]]] for i in idx],
                        np.int64)

    def texts(self, i, rng, heldout=False, display=False):
        truth = synthetic.describe(self.facts[i], rng, heldout=heldout)
        return [truth] + [synthetic.describe(f, rng, heldout=heldout) for f in self.negatives[i]]


def elpv_set(part: str, size: int, limit: int | None = None, types=TYPES, seed: int = 0,
             fold: tuple[int, int] | None = None) -> ElpvSet:
    cells = [c for c in elpv.cells_for(part, limit=limit, seed=seed, fold=fold) if c.cell_type in types]
    return ElpvSet(f"elpv-{part}", elpv.load_images(cells, size), [c.id for c in cells],
                   levels=np.array([c.level for c in cells]), types=[c.cell_type for c in cells],
                   catalog=el_catalog())


def synthetic_set(name: str, n: int, size: int, seed: int, on_elpv_fraction: float,
                  backgrounds: np.ndarray | None, negatives: int = 3) -> SyntheticSet:
    """n rendered frames, each with `negatives` hard negatives (16 = every one-fact change
    of a defect: 5 types, 8 locations, 2 severities, no defect)."""
    rng = np.random.default_rng(seed)
    images, facts, changed = np.empty((n, size, size), np.uint8), [], []
    for i in range(n):
        use_cell = backgrounds is not None and len(backgrounds) and rng.random() < on_elpv_fraction
        background = backgrounds[rng.integers(len(backgrounds))] if use_cell else None
        images[i], f = synthetic.render_sample(rng, size=size, background=background)
        facts.append(f)
        changed.append(synthetic.hard_negatives(f, rng, k=negatives))
    return SyntheticSet(name, images, [f"{name}-{i}" for i in range(n)], facts=facts, negatives=changed)


def augment(gray: np.ndarray, rng: np.random.Generator, flips: bool, quarter_turns: bool = False,
            camera_changes: bool = False) -> np.ndarray:
    """Flips (and, if asked, quarter turns and a camera change) and a mild brightness/contrast
    jitter (uint8 in, uint8 out)."""
    if flips and quarter_turns:
        gray = np.rot90(gray, int(rng.integers(4)))
    if flips and rng.random() < 0.5:
        gray = gray[:, ::-1]
    if flips and rng.random() < 0.5:
        gray = gray[::-1, :]
    if camera_changes:
        gray = camera_change(np.ascontiguousarray(gray), rng)
    gain, bias = rng.uniform(0.85, 1.15), rng.uniform(-12, 12)
    return np.clip(gray.astype(np.float32) * gain + bias, 0, 255).astype(np.uint8)


def camera_change(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One change a camera makes to the frame, drawn at random, or none (a quarter of the time):
    exposure x0.7-1.3, out of focus (Gaussian blur, sigma 0.5-1.8 px) or JPEG at quality 25-90.
    The eval's camera variations (x0.7, x1.3, sigma 1.5, quality 40; export/robustness.py) lie
    inside these ranges: their figure measures indifference to kinds of change seen in training."""
    kind = int(rng.integers(4))
    if kind == 0:
        return np.clip(gray.astype(np.float32) * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)
    if kind == 1:
        return cv2.GaussianBlur(gray, (0, 0), rng.uniform(0.5, 1.8))
    if kind == 2:
        _, data = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(25, 91))])
        return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    return gray


def iterate_batches(data: CandidateSet, batch_size: int, rng: np.random.Generator,
                    train: bool, heldout: bool = False, display: bool = False,
                    indices: np.ndarray | None = None):
    """Yield (uint8 frames (B,S,S), texts (B*C), C, indices) in order or shuffled."""
    order = indices if indices is not None else np.arange(len(data))
    if train:
        order = rng.permutation(order)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        frames = np.stack([augment(data.images[i], rng, data.flippable, data.quarter_turns, data.camera_changes)
                           if train else data.images[i] for i in idx])
        sets = [data.texts(int(i), rng, heldout=heldout, display=display) for i in idx]
        yield frames, [t for s in sets for t in s], len(sets[0]), idx
