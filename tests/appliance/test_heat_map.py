"""Where on the frame the verdict comes from: the shipped bundle's patch grid, occluded one cell at a time."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from appliance import ui
from appliance.runtime import ModelRuntime
from models.preprocess import frame_to_input

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "bundles" / "el-solar-default"


@pytest.fixture(scope="module")
def runtime():
    return ModelRuntime(BUNDLE, json.loads((BUNDLE / "manifest.json").read_text()))


def cell(seed: int = 0) -> np.ndarray:
    frame = np.random.default_rng(seed).normal(150, 12, (300, 300)).clip(0, 255).astype(np.uint8)
    cv2.line(frame, (20, 30), (120, 110), 25, 4)                 # a dark crack in the upper left
    return frame


def test_each_cell_of_the_grid_is_the_verdicts_lead_lost_without_that_patch(runtime):
    frame = cell()
    judgement = runtime.judge(frame)
    heat = runtime.heat_map(frame, judgement.decision.ranking)
    grid = runtime.spec.image_size // 32                          # the bundle's patch grid
    assert heat.shape == (grid, grid) and np.isfinite(heat).all() and np.abs(heat).max() > 0
    # recomputed by hand for one cell: the patch replaced by the blank frame's patch
    verdict, runner_up = [t for t, _ in judgement.decision.ranking[:2]]
    patches = runtime.backend.image_features(frame_to_input(frame, runtime.spec))
    features = runtime.text_features([verdict, runner_up])
    occluded = patches.copy()
    occluded[0, grid + 2] = runtime.blank_patches[0, grid + 2]     # row 1, column 2
    full, without = runtime.backend.rewards(patches, features)[0], runtime.backend.rewards(occluded, features)[0]
    assert heat[1, 2] == pytest.approx((full[0] - full[1]) - (without[0] - without[1]), abs=1e-4)


def test_the_overlay_marks_the_frame_and_falls_back_to_the_plain_frame(runtime):
    frame = cell(1)
    appliance = SimpleNamespace(runtime=runtime)
    ranking = runtime.judge(frame).decision.ranking
    shown = ui.with_heat_map(appliance, frame, ranking, key=None)
    assert shown.shape == (300, 300, 3) and not np.array_equal(shown, ui._rgb(frame))
    refusing = SimpleNamespace(runtime=SimpleNamespace(heat_map=lambda *_: None))
    assert np.array_equal(ui.with_heat_map(refusing, frame, ranking), ui._rgb(frame))


def test_the_facts_of_the_verdict_with_how_much_the_picture_supports_each(runtime):
    ranking = runtime.judge(cell(2)).decision.ranking
    support = runtime.fact_support(ranking)
    verdict = next(e for e in runtime.catalog.entries if e.display == ranking[0][0])
    assert [(f, v) for f, v, _ in support] == list(verdict.facts.items())
    assert all(0 < p <= 1 for _, _, p in support)
    scores = np.array([s for _, s in ranking])
    probs = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
    same_type = sum(p for (t, _), p in zip(ranking, probs)
                    if next(e for e in runtime.catalog.entries if e.display == t).facts["type"] == verdict.facts["type"])
    assert dict((f, p) for f, _, p in support)["type"] == pytest.approx(same_type)
    html = ui.facts_html(SimpleNamespace(runtime=runtime), ranking)
    assert "The picture:" in html and ("supports" in html or "doubts" in html)
    assert f"defect level {round(verdict.facts['level'] * 3)} of 3" in html
    assert runtime.fact_support([("a typed explanation", 1.0), *ranking]) == []
