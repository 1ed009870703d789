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
             "lower left", "lower center", "lower right")     # 3x3 grid, row-major
SEVERITIES = ("minor", "moderate", "severe")
SEVERITY_SCALE = {"minor": 0.45, "moderate": 0.75, "severe": 1.0}   # multiplies size and contrast

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
HELDOUT_PHRASING_IDS = frozenset({3, 8})      # never used for training
HELDOUT_NO_DEFECT_IDS = frozenset({4})


@dataclass(frozen=True)
class DefectFacts:
    defect: str | None          # None = no defect
    location: str | None
    severity: str | None


NO_DEFECT = DefectFacts(None, None, None)


# ---------------------------------------------------------------- backgrounds

def procedural_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed metal, speckle or a smooth gradient, mid-gray so defects can go either way."""
    kind = rng.integers(3)
    base = rng.uniform(90, 170)
    if kind == 0:    # brushed: noise smeared along one axis
        streak = (int(rng.integers(9, 25)), 1)
        noise = rng.normal(0, 18, (size, size)).astype(np.float32)
        img = cv2.blur(noise, streak if rng.random() < 0.5 else streak[::-1]) + base
    elif kind == 1:  # speckle
        img = cv2.GaussianBlur(rng.normal(0, 12, (size, size)).astype(np.float32), (3, 3), 0) + base
    else:            # gradient with mild noise
        ramp = np.linspace(-20, 20, size, dtype=np.float32)
        img = base + ramp[None, :] * rng.uniform(-1, 1) + ramp[:, None] * rng.uniform(-1, 1)
        img = img + rng.normal(0, 5, (size, size)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- defects

def cell_box(location: str, size: int) -> tuple[int, int, int, int]:
    """(x, y, w, h) of the 3x3 grid cell named by `location`."""
    row, col = divmod(LOCATIONS.index(location), 3)
    edges = np.linspace(0, size, 4).astype(int)
    return int(edges[col]), int(edges[row]), int(edges[col + 1] - edges[col]), int(edges[row + 1] - edges[row])


def _center(box, radius: float, rng) -> tuple[float, float]:
    """A random point at least `radius` from the cell's edges (the cell centre if it cannot be)."""
    x, y, w, h = box
    rx, ry = min(radius, w / 2), min(radius, h / 2)
    return x + rng.uniform(rx, w - rx), y + rng.uniform(ry, h - ry)


def _thickness(box, scale: float, per_width: float) -> int:
    return max(1, round(box[2] * per_width * scale))


def _ipt(point) -> tuple[int, int]:
    return int(round(point[0])), int(round(point[1]))


def render_defect(image: np.ndarray, facts: DefectFacts, rng: np.random.Generator) -> np.ndarray:
    """A copy of `image` (uint8 HxW) with the defect drawn inside its 3x3 cell."""
    if facts.defect is None:
        return image.copy()
    box = cell_box(facts.location, image.shape[0])
    layer = np.zeros(image.shape, np.float32)   # signed intensity change
    DRAW[facts.defect](layer, box, SEVERITY_SCALE[facts.severity], rng)
    return np.clip(image.astype(np.float32) + layer, 0, 255).astype(np.uint8)


def _scratch(layer, box, scale, rng):
    """Thin, long, straight line, bright or dark."""
    half_length = box[2] * 0.45 * (0.4 + 0.6 * scale)
    cx, cy = _center(box, box[2] * 0.3, rng)
    angle = rng.uniform(0, np.pi)
    offset = np.array([np.cos(angle), np.sin(angle)]) * half_length
    _, p1, p2 = cv2.clipLine(box, _ipt((cx, cy) - offset), _ipt((cx, cy) + offset))
    sign = 1 if rng.random() < 0.5 else -1
    cv2.line(layer, p1, p2, sign * (40 + 70 * scale), _thickness(box, scale, 0.04), cv2.LINE_AA)


def _jagged_line(start, end, segments, jitter, box, rng) -> np.ndarray:
    """Polyline from start to end whose inner points wander sideways by ~jitter, kept in the box."""
    start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
    along = end - start
    normal = np.array([-along[1], along[0]]) / max(np.linalg.norm(along), 1e-6)
    offsets = rng.normal(0, jitter, segments + 1)
    offsets[[0, -1]] = 0
    points = start + np.linspace(0, 1, segments + 1)[:, None] * along + offsets[:, None] * normal
    x, y, w, h = box
    points = np.clip(points, [x + 1, y + 1], [x + w - 2, y + h - 2])
    return np.round(points).astype(np.int32)


def _crack(layer, box, scale, rng):
    """Dark jagged polyline with side branches (longer, thicker and more branches when severe)."""
    w = box[2]
    length = w * 0.75 * (0.4 + 0.6 * scale)
    direction = rng.uniform(0, np.pi)
    heading = np.array([np.cos(direction), np.sin(direction)])
    center = np.array(_center(box, length / 2 + 2, rng))
    trunk = _jagged_line(center - heading * length / 2, center + heading * length / 2,
                         4 + round(6 * scale), w * 0.022, box, rng)
    cv2.polylines(layer, [trunk], False, -(50 + 70 * scale), _thickness(box, scale, 0.035), cv2.LINE_AA)
    for _ in range(1 + int(scale >= 0.75) + int(scale >= 1.0)):
        fork = trunk[rng.integers(1, len(trunk) - 1)]
        side = direction + rng.choice([-1, 1]) * rng.uniform(0.5, 1.2)
        tip = fork + np.array([np.cos(side), np.sin(side)]) * length * rng.uniform(0.25, 0.45)
        branch = _jagged_line(fork, tip, 3, w * 0.025, box, rng)
        cv2.polylines(layer, [branch], False, -(40 + 60 * scale), 1, cv2.LINE_AA)


def _stain(layer, box, scale, rng):
    """Soft, blurred, darker blob made of two overlapping ellipses."""
    w = box[2]
    axes = np.array([w * 0.22, w * 0.15]) * (0.4 + scale)
    cx, cy = _center(box, axes[0] + w * 0.05, rng)
    blob = np.zeros_like(layer)
    for _ in range(2):
        shift = rng.normal(0, w * 0.04, 2)
        cv2.ellipse(blob, _ipt((cx + shift[0], cy + shift[1])), _ipt(axes * rng.uniform(0.7, 1.0, 2)),
                    rng.uniform(0, 180), 0, 360, 1.0, -1)
    blob = np.minimum(blob, 1.0) * -(40 + 50 * scale)
    kernel = max(3, int(w * 0.15) | 1)
    layer += cv2.GaussianBlur(blob, (kernel, kernel), 0)


def _pit(layer, box, scale, rng):
    """Cluster of small dark dots."""
    w = box[2]
    spread = w * 0.16 * (0.5 + scale)
    radius = max(1, round(w * 0.03 * (0.5 + scale)))
    cx, cy = _center(box, spread + radius, rng)
    for _ in range(3 + round(7 * scale)):
        dx, dy = np.clip(rng.normal(0, spread / 2, 2), -spread, spread)
        cv2.circle(layer, _ipt((cx + dx, cy + dy)), radius, -(50 + 80 * scale), -1, cv2.LINE_AA)


def _burn(layer, box, scale, rng):
    """Dark irregular region, darker in the core, with a bright rim."""
    w = box[2]
    radius = w * 0.2 * (0.4 + scale)
    cx, cy = _center(box, radius * 1.25 + 2, rng)
    corners = 11
    angles = (np.arange(corners) + rng.uniform(-0.3, 0.3, corners)) * 2 * np.pi / corners
    radii = radius * rng.uniform(0.65, 1.25, len(angles))
    outline = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    core = np.array([cx, cy]) + (outline - [cx, cy]) * 0.55
    char = np.zeros_like(layer)
    cv2.fillPoly(char, [np.round(outline).astype(np.int32)], -(40 + 50 * scale), cv2.LINE_AA)
    cv2.fillPoly(char, [np.round(core).astype(np.int32)], -(70 + 80 * scale), cv2.LINE_AA)
    layer += cv2.GaussianBlur(char, (3, 3), 0)
    cv2.polylines(layer, [np.round(outline).astype(np.int32)], True, 40 + 50 * scale,
                  _thickness(box, scale, 0.03), cv2.LINE_AA)


def _dent(layer, box, scale, rng):
    """Ellipse shaded like a depression: a highlight on one side, a shadow on the other."""
    w = box[2]
    axes = np.array([w * 0.2, w * 0.15]) * (0.4 + scale)
    cx, cy = _center(box, axes[0] + 2, rng)
    mask = np.zeros_like(layer)
    cv2.ellipse(mask, _ipt((cx, cy)), _ipt(axes), rng.uniform(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA)
    light = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:layer.shape[0], 0:layer.shape[1]].astype(np.float32)
    ramp = ((xs - cx) * np.cos(light) + (ys - cy) * np.sin(light)) / axes[0]
    layer += cv2.GaussianBlur(mask * np.clip(ramp, -1, 1) * (50 + 70 * scale), (5, 5), 0)


DRAW = {"scratch": _scratch, "crack": _crack, "stain": _stain, "pit": _pit, "burn": _burn, "dent": _dent}


# ---------------------------------------------------------------- samples

def sample_facts(rng: np.random.Generator, p_no_defect: float = 0.2) -> DefectFacts:
    if rng.random() < p_no_defect:
        return NO_DEFECT
    return DefectFacts(DEFECT_TYPES[rng.integers(len(DEFECT_TYPES))], LOCATIONS[rng.integers(len(LOCATIONS))],
                       SEVERITIES[rng.integers(len(SEVERITIES))])


def render_sample(rng: np.random.Generator, size: int = 160,
                  background: np.ndarray | None = None) -> tuple[np.ndarray, DefectFacts]:
    """A size x size uint8 frame with a random defect (or none) and its facts.
    `background` (grayscale, any size) replaces the procedural texture, e.g. a defect-free ELPV cell."""
    if background is None:
        image = procedural_texture(rng, size)
    else:
        gray = cv2.cvtColor(background, cv2.COLOR_BGR2GRAY) if background.ndim == 3 else background
        image = cv2.resize(gray.astype(np.uint8), (size, size), interpolation=cv2.INTER_AREA)
    facts = sample_facts(rng)
    return render_defect(image, facts, rng), facts


def one_fact_changes(facts: DefectFacts) -> list[list[DefectFacts]]:
    """All facts differing from `facts` in exactly one fact, grouped by the fact that changed."""
    if facts.defect is None:     # the one change: there is a defect (any one)
        return [[DefectFacts(d, loc, sev) for d in DEFECT_TYPES for loc in LOCATIONS for sev in SEVERITIES]]
    return [[replace(facts, defect=d) for d in DEFECT_TYPES if d != facts.defect],
            [replace(facts, location=loc) for loc in LOCATIONS if loc != facts.location],
            [replace(facts, severity=sev) for sev in SEVERITIES if sev != facts.severity],
            [NO_DEFECT]]


FACT_KINDS = ("presence", "type", "location", "severity")


def changed_fact(truth: DefectFacts, negative: DefectFacts) -> str:
    """Which one fact a hard negative changed: presence, type, location or severity."""
    if (truth.defect is None) != (negative.defect is None):
        return "presence"
    if truth.defect != negative.defect:
        return "type"
    return "location" if truth.location != negative.location else "severity"


FACT_CLASSES = (1 + len(DEFECT_TYPES), 1 + len(LOCATIONS), 1 + len(SEVERITIES))   # 0 = no defect


def fact_labels(facts: DefectFacts) -> tuple[int, int, int]:
    """(type, location, severity) class ids, 0 for each when there is no defect."""
    if facts.defect is None:
        return 0, 0, 0
    return (1 + DEFECT_TYPES.index(facts.defect), 1 + LOCATIONS.index(facts.location),
            1 + SEVERITIES.index(facts.severity))


def hard_negatives(facts: DefectFacts, rng: np.random.Generator, k: int = 3) -> list[DefectFacts]:
    """k distinct facts, each differing from `facts` in exactly one fact; the changed facts
    are taken in turn (type, location, severity, presence in random order) so k <= 4 never
    repeats a kind of change."""
    groups = [[group[i] for i in rng.permutation(len(group))] for group in one_fact_changes(facts)]
    groups = [groups[i] for i in rng.permutation(len(groups))]
    in_turn = [group[i] for i in range(max(map(len, groups))) for group in groups if i < len(group)]
    if k > len(in_turn):
        raise ValueError(f"only {len(in_turn)} one-fact changes of {facts}, asked for {k}")
    return in_turn[:k]


def describe(facts: DefectFacts, rng: np.random.Generator, heldout: bool = False) -> str:
    """One explanation of `facts`; heldout picks only from the held-out templates, else only from the others."""
    if facts.defect is None:
        templates, held = NO_DEFECT_PHRASINGS, HELDOUT_NO_DEFECT_IDS
    else:
        templates, held = PHRASINGS, HELDOUT_PHRASING_IDS
    ids = [i for i in range(len(templates)) if (i in held) == heldout]
    return templates[ids[rng.integers(len(ids))]].format(
        defect=facts.defect, location=facts.location, severity=facts.severity)
