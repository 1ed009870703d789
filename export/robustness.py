"""What the line meets that the test split does not: camera variations, frames with no part in
them, and explanations worded by someone who never saw the catalog (issue 18, part 4).

All three run the bundle's graphs through a ScoringBackend, as `evaluate_bundle` does:

* camera variations: each ELPV frame turned a quarter, half and three-quarter turn (also as a
  station with `views: upright` sees them: turned back so the busbars run across), brighter,
  darker, out of focus, JPEG-compressed; how often the verdict (the top catalog entry, and
  whether it names a defect) stays the one of the unchanged frame, and the binary accuracy;
* no part in view: all-black, all-white, flat grey and noise frames through the appliance's own
  decide step; each must be flagged (never an unflagged verdict), and the model's bare verdict
  on it is reported too;
* outside phrasings: the ELPV frames scored against each column of those texts instead of the
  catalog's display texts; binary accuracy beside the catalog's. Two sets: the first
  (training/data/outside_phrasings.yaml) was seen by whoever wrote the training phrasings
  (training/data/elpv_phrasings.py); the second (outside_phrasings_unseen.yaml) was written
  without sight of the catalog, the training phrasings or the first set.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml

from appliance import decide
from models.preprocess import frame_problem, turn_upright
from export import verify
from export.decide_stats import catalog_defective
from training.metrics import elpv_metrics

OUTSIDE_PHRASINGS = Path(__file__).resolve().parents[1] / "training" / "data" / "outside_phrasings.yaml"
OUTSIDE_PHRASINGS_UNSEEN = OUTSIDE_PHRASINGS.with_name("outside_phrasings_unseen.yaml")


def _jpeg(gray: np.ndarray, quality: int = 40) -> np.ndarray:
    ok, data = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)


def _gain(gray: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(gray.astype(np.float32) * gain, 0, 255).astype(np.uint8)


CAMERA_VARIATIONS = {
    "quarter_turn": lambda g: np.rot90(g, 1),
    "half_turn": lambda g: np.rot90(g, 2),
    "three_quarter_turn": lambda g: np.rot90(g, 3),
    "brighter": lambda g: _gain(g, 1.3),
    "darker": lambda g: _gain(g, 0.7),
    "out_of_focus": lambda g: cv2.GaussianBlur(g, (0, 0), 1.5),
    "jpeg_q40": _jpeg,
    # the same turns on a station with `views: upright` (the frame turned so the busbars run across)
    "quarter_turn_upright": lambda g: turn_upright(np.rot90(g, 1)),
    "half_turn_upright": lambda g: turn_upright(np.rot90(g, 2)),
    "three_quarter_turn_upright": lambda g: turn_upright(np.rot90(g, 3)),
}
# `views: upright2` averages each frame's upright view and its half turn: every quarter turn then
# gets the very same rewards (tests/models/test_upright.py), so it has no variations to measure.


def no_part_frames(size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Frames a camera sends when there is nothing to inspect (lens cap, dead camera, blown
    exposure, pointed at the wall, sensor noise)."""
    rng = np.random.default_rng(seed)
    return {"all_black": np.zeros((size, size), np.uint8),
            "dark_sensor_noise": np.clip(rng.normal(6, 2, (size, size)), 0, 255).astype(np.uint8),
            "all_white": np.full((size, size), 255, np.uint8),
            "flat_grey": np.full((size, size), 128, np.uint8),
            "noise": rng.integers(0, 256, (size, size)).astype(np.uint8)}


def camera_variation_metrics(backend, tokenizer, spec, data, catalog, base_rewards: np.ndarray,
                             views: str = "one") -> dict:
    defective = catalog_defective(catalog)
    base_top = base_rewards.argmax(1)
    out = {}
    for name, change in CAMERA_VARIATIONS.items():
        images = np.stack([np.ascontiguousarray(change(g)) for g in data.images])
        _, rewards = verify.backend_outputs(backend, tokenizer, spec, images, catalog.displays, views=views)
        top = rewards.argmax(1)
        out[name] = {"verdict_agreement": float((defective[top] == defective[base_top]).mean()),
                     "top1_agreement": float((top == base_top).mean()),
                     "elpv_binary_accuracy": elpv_metrics(rewards, data)[0]["elpv_binary_accuracy"]}
    return out


def no_part_metrics(backend, tokenizer, spec, catalog, manifest: dict, blank: np.ndarray,
                    views: str = "one") -> dict:
    """`blank`: the catalog's rewards on the blank frame (the image-reliance check), as on the appliance."""
    thresholds = decide.Thresholds.from_manifest(decide.manifest_thresholds(manifest, views))
    defective = list(catalog_defective(catalog))
    out = {}
    for name, frame in no_part_frames(spec.image_size).items():
        patches, rewards = verify.backend_outputs(backend, tokenizer, spec, frame[None], catalog.displays,
                                                  views=views)
        problem = frame_problem(frame)
        with_guard = decide.decide(catalog.displays, rewards[0], blank, patches[0], thresholds, manifest["ood"],
                                   defective, problem)
        bare = decide.decide(catalog.displays, rewards[0], blank, patches[0], thresholds, manifest["ood"], defective)
        out[name] = {"flagged": with_guard.flagged, "reason": problem,
                     "model_verdict": bare.verdict, "flagged_without_frame_check": bare.flagged}
    return out


def load_outside_phrasings(catalog, path: Path = OUTSIDE_PHRASINGS) -> list[list[str]]:
    """Columns of outside phrasings, each one text per catalog entry in catalog order."""
    entries = yaml.safe_load(Path(path).read_text())["entries"]
    missing = [e.id for e in catalog.entries if e.id not in entries]
    if missing:
        raise ValueError(f"{path} has no outside phrasings for catalog entries {missing}")
    columns = min(len(entries[e.id]) for e in catalog.entries)
    return [[entries[e.id][k] for e in catalog.entries] for k in range(columns)]


def outside_phrasing_metrics(backend, tokenizer, spec, data, catalog, catalog_binary: float,
                             views: str = "one", path: Path = OUTSIDE_PHRASINGS) -> dict:
    per_column = []
    for texts in load_outside_phrasings(catalog, path):
        _, rewards = verify.backend_outputs(backend, tokenizer, spec, data.images, texts, views=views)
        per_column.append(elpv_metrics(rewards, data)[0]["elpv_binary_accuracy"])
    mean = float(np.mean(per_column))
    return {"elpv_binary_accuracy": mean, "per_column": per_column, "catalog_elpv_binary_accuracy": catalog_binary,
            "gap_points": 100 * (catalog_binary - mean)}


def robustness_metrics(backend, tokenizer, spec, data, catalog, manifest: dict, base_rewards: np.ndarray,
                       blank: np.ndarray, catalog_binary: float, views: str = "one") -> dict:
    """base_rewards (N, K) and blank (K,): the catalog's rewards on the unchanged frames and on the
    blank frame; catalog_binary: their ELPV binary accuracy (all already computed by the eval, with
    the same `views`)."""
    return {"camera_variations": camera_variation_metrics(backend, tokenizer, spec, data, catalog, base_rewards,
                                                          views),
            "no_part_in_view": no_part_metrics(backend, tokenizer, spec, catalog, manifest, blank, views),
            "outside_phrasings": outside_phrasing_metrics(backend, tokenizer, spec, data, catalog, catalog_binary,
                                                          views),
            "outside_phrasings_unseen": outside_phrasing_metrics(backend, tokenizer, spec, data, catalog,
                                                                 catalog_binary, views, OUTSIDE_PHRASINGS_UNSEEN)}
