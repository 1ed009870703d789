"""Synthetic surface defects rendered with OpenCV, with known type, location and severity.

Frames are procedural textures or defect-free ELPV cells; one defect (or none) is drawn in
one cell of a 3x3 grid. Explanations are written from the facts in many phrasings; hard
negatives differ from the truth in exactly one fact, so text alone cannot rank them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

DEFECT_TYPES = ("scratch", "crack", "stain", "pit", "burn", "dent")
LOCATIONS = ("upper left", "upper center", "upper right", "middle left", "center", "middle right",
             "lower left", "lower center", "lower right")
SEVERITIES = ("minor", "moderate", "severe")
SEVERITY_SCALE = {"minor": 0.45, "moderate": 0.75, "severe": 1.0}

PHRASINGS = (
    "{severity} {defect} in the {location} region",
    "there is a {defect} ({severity}) at the {location}",
    "{defect}, {severity}, located {location}",
    "a {severity} {defect} can be seen in the {location} area",
    "{location}: {severity} {defect}",
    "defect found: {defect} of {severity} extent, {location}",
    "the part shows a {severity} {defect} towards the {location}",
    "{severity}-grade {defect} near the {location}",
    "visible {defect} in the {location} zone, severity {severity}",
    "inspection result: {defect} at {location}, {severity}",
    "one {defect} at the {location}, rated {severity}",
    "{severity} damage: a {defect} in the {location} part of the frame",
)
NO_DEFECT_PHRASINGS = (
    "no defect, surface clean",
    "part looks good, nothing wrong",
    "no visible damage anywhere",
    "clean surface with no defects",
    "inspection passed: no defect found",
    "the surface is intact, no flaws",
)
HELDOUT_PHRASING_IDS = frozenset({3, 8})
HELDOUT_NO_DEFECT_IDS = frozenset({4})


@dataclass(frozen=True)
class DefectFacts:
    defect: str | None          # None = no defect
    location: str | None
    severity: str | None


NO_DEFECT = DefectFacts(None, None, None)


def procedural_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed metal, speckle or a smooth gradient, mid-gray so defects can go either way."""
    kind = rng.integers(3)
    base = rng.uniform(90, 170)
    if kind == 0:   # brushed: noise blurred along one axis
        noise = rng.normal(0, 18, (size, size)).astype(np.float32)
        img = cv2.blur(noise, (int(rng.integers(9, 25)), 1)) + base
    elif kind == 1:  # speckle
        img = cv2.GaussianBlur(rng.normal(0, 12, (size, size)).astype(np.float32), (3, 3), 0) + base
    else:            # gradient with mild noise
        ramp = np.linspace(-20, 20, size, dtype=np.float32)
        img = base + ramp[None, :] * rng.uniform(-1, 1) + ramp[:, None] * rng.uniform(-1, 1)
        img = img + rng.normal(0, 5, (size, size)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _cell_box(location: str, size: int) -> tuple[int, int, int, int]:
    row, col = divmod(LOCATIONS.index(location), 3)
    step = size / 3
    return int(col * step), int(row * step), int(step), int(step)


def _point(rng, box, margin=0.25):
    x, y, w, h = box
    return (x + w * rng.uniform(margin, 1 - margin), y + h * rng.uniform(margin, 1 - margin))


def render_defect(image: np.ndarray, facts: DefectFacts, rng: np.random.Generator) -> np.ndarray:
    if facts.defect is None:
        return image.copy()
    size = image.shape[0]
    box = _cell_box(facts.location, size)
    scale = SEVERITY_SCALE[facts.severity]
    layer = np.zeros(image.shape, np.float32)   # signed intensity change
    DRAW[facts.defect](layer, box, scale, rng)
    return np.clip(image.astype(np.float32) + layer, 0, 255).astype(np.uint8)


def _scratch(layer, box, scale, rng):
    x, y, w, h = box
    cx, cy = _point(rng, box, 0.4)
    angle = rng.uniform(0, np.pi)
    half = 0.45 * w * (0.5 + 0.5 * scale)
    p1 = (int(cx - half * np.cos(angle)), int(cy - half * np.sin(angle)))
    p2 = (int(cx + half * np.cos(angle)), int(cy + half * np.sin(angle)))
    cv2.line(layer, p1, p2, 90 * scale, max(1, int(w * 0.025 * (0.5 + scale))), cv2.LINE_AA)


def _crack(layer, box, scale, rng):
    x, y, w, h = box
    pts = [_point(rng, box, 0.2)]
    steps = 4 + int(5 * scale)
    direction = rng.uniform(0, 2 * np.pi)
    for _ in range(steps):
        direction += rng.normal(0, 0.6)
        step = w * 0.09
        nx = np.clip(pts[-1][0] + step * np.cos(direction), x + 2, x + w - 2)
        ny = np.clip(pts[-1][1] + step * np.sin(direction), y + 2, y + h - 2)
        pts.append((nx, ny))
    poly = np.array(pts, np.int32)
    cv2.polylines(layer, [poly], False, -110 * scale, max(1, int(w * 0.03 * (0.5 + scale))), cv2.LINE_AA)
    branch = poly[len(poly) // 2]
    end = (int(np.clip(branch[0] + rng.normal(0, w * 0.2), x, x + w)), int(np.clip(branch[1] + rng.normal(0, h * 0.2), y, y + h)))
    cv2.line(layer, tuple(int(v) for v in branch), end, -90 * scale, 1, cv2.LINE_AA)


def _stain(layer, box, scale, rng):
    x, y, w, h = box
    cx, cy = _point(rng, box, 0.35)
    axes = (int(w * 0.28 * (0.4 + scale)), int(h * 0.2 * (0.4 + scale)))
    blob = np.zeros_like(layer)
    cv2.ellipse(blob, (int(cx), int(cy)), axes, rng.uniform(0, 180), 0, 360, -70 * scale, -1)
    k = max(3, int(w * 0.15) | 1)
    layer += cv2.GaussianBlur(blob, (k, k), 0)


def _pit(layer, box, scale, rng):
    x, y, w, h = box
    for _ in range(3 + int(6 * scale)):
        cx, cy = _point(rng, box, 0.2)
        cv2.circle(layer, (int(cx), int(cy)), max(1, int(w * 0.03 * (0.6 + scale))), -120 * scale, -1, cv2.LINE_AA)


def _burn(layer, box, scale, rng):
    x, y, w, h = box
    cx, cy = _point(rng, box, 0.35)
    n = 9
    radius = w * 0.25 * (0.4 + scale)
    angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
    radii = radius * rng.uniform(0.6, 1.2, n)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1).astype(np.int32)
    cv2.fillPoly(layer, [pts], -100 * scale, cv2.LINE_AA)
    cv2.polylines(layer, [pts], True, 60 * scale, max(1, int(w * 0.03)), cv2.LINE_AA)


def _dent(layer, box, scale, rng):
    x, y, w, h = box
    cx, cy = _point(rng, box, 0.35)
    axes = (int(w * 0.22 * (0.4 + scale)), int(h * 0.16 * (0.4 + scale)))
    shade = np.zeros_like(layer)
    cv2.ellipse(shade, (int(cx), int(cy)), axes, 0, 0, 360, -60 * scale, -1)
    cv2.ellipse(shade, (int(cx - axes[0] * 0.3), int(cy - axes[1] * 0.3)), (axes[0] // 2, axes[1] // 2),
                0, 0, 360, 70 * scale, -1)
    layer += cv2.GaussianBlur(shade, (5, 5), 0)


DRAW = {"scratch": _scratch, "crack": _crack, "stain": _stain, "pit": _pit, "burn": _burn, "dent": _dent}


def sample_facts(rng: np.random.Generator, p_no_defect: float = 0.2) -> DefectFacts:
    if rng.random() < p_no_defect:
        return NO_DEFECT
    return DefectFacts(DEFECT_TYPES[rng.integers(6)], LOCATIONS[rng.integers(9)], SEVERITIES[rng.integers(3)])


def render_sample(rng: np.random.Generator, size: int = 160,
                  background: np.ndarray | None = None) -> tuple[np.ndarray, DefectFacts]:
    if background is None:
        image = procedural_texture(rng, size)
    else:
        image = cv2.resize(background, (size, size), interpolation=cv2.INTER_AREA)
    facts = sample_facts(rng)
    return render_defect(image, facts, rng), facts


def _other(options, current, rng):
    choices = [o for o in options if o != current]
    return choices[rng.integers(len(choices))]


def hard_negatives(facts: DefectFacts, rng: np.random.Generator, k: int = 3) -> list[DefectFacts]:
    """k distinct facts, each differing from `facts` in exactly one respect."""
    if facts.defect is None:   # the only one-fact change: "there is a defect"
        negatives = set()
        while len(negatives) < k:
            negatives.add(sample_facts(rng, p_no_defect=0.0))
        return sorted(negatives, key=lambda f: (f.defect, f.location, f.severity))[:k]
    changes = [lambda: replace(facts, defect=_other(DEFECT_TYPES, facts.defect, rng)),
               lambda: replace(facts, location=_other(LOCATIONS, facts.location, rng)),
               lambda: replace(facts, severity=_other(SEVERITIES, facts.severity, rng)),
               lambda: NO_DEFECT]
    out: list[DefectFacts] = []
    order = list(rng.permutation(4))
    while len(out) < k:
        candidate = changes[order[len(out) % 4]]() if len(out) < 4 else changes[rng.integers(3)]()
        if candidate not in out:
            out.append(candidate)
    return out


def describe(facts: DefectFacts, rng: np.random.Generator, heldout: bool = False) -> str:
    if facts.defect is None:
        ids = [i for i in range(len(NO_DEFECT_PHRASINGS)) if (i in HELDOUT_NO_DEFECT_IDS) == heldout]
        return NO_DEFECT_PHRASINGS[ids[rng.integers(len(ids))]]
    ids = [i for i in range(len(PHRASINGS)) if (i in HELDOUT_PHRASING_IDS) == heldout]
    template = PHRASINGS[ids[rng.integers(len(ids))]]
    return template.format(defect=facts.defect, location=facts.location, severity=facts.severity)
