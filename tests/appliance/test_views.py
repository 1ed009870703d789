"""views: rot4 judges a frame as the mean of its four quarter turns: the same verdict however the camera is turned."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.config import config_from_dict
from appliance.runtime import ModelRuntime
from models.errors import ConfigError

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "bundles" / "el-solar-default"
MANIFEST = json.loads((BUNDLE / "manifest.json").read_text())


def frames(n: int = 6):
    rng = np.random.default_rng(4)
    for i in range(n):
        frame = rng.normal(140, 15, (300, 300)).clip(0, 255).astype(np.uint8)
        cv2.line(frame, (20 + 30 * i, 40), (200, 260 - 25 * i), 30, 3)
        yield frame


def test_rot4_gives_the_same_rewards_for_every_quarter_turn_and_one_does_not():
    rot4, one = ModelRuntime(BUNDLE, MANIFEST, views="rot4"), ModelRuntime(BUNDLE, MANIFEST)
    moved = 0
    for frame in frames():
        base = rot4.judge(frame)
        for k in (1, 2, 3):
            turned = rot4.judge(np.rot90(frame, k))
            assert turned.decision.verdict == base.decision.verdict
            np.testing.assert_allclose(turned.rewards, base.rewards, atol=1e-4)
        moved += not np.allclose(one.judge(np.rot90(frame)).rewards, one.judge(frame).rewards, atol=1e-4)
    assert moved >= 4                        # a single view does move with the camera


def test_one_view_is_the_plain_judgement_and_rot4_its_four_view_mean():
    rot4, one = ModelRuntime(BUNDLE, MANIFEST, views="rot4"), ModelRuntime(BUNDLE, MANIFEST)
    frame = next(frames())
    mean = np.mean([one.judge(np.rot90(frame, k)).rewards for k in range(4)], axis=0)
    np.testing.assert_allclose(rot4.judge(frame).rewards, mean, atol=1e-4)


def test_an_unknown_view_set_is_refused():
    with pytest.raises(ConfigError, match="views must be one, upright, upright2, rot4"):
        config_from_dict({"views": "rot8"})
