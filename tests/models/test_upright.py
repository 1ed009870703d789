"""views: upright turns a solar cell so that its busbars run across, as in every training cell:
a camera mounted a quarter turn off then sees the cell as trained on, or its half turn."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from appliance.runtime import ModelRuntime
from models.preprocess import turn_upright, upright_quarter_turns
from training.data import elpv

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "bundles" / "el-solar-default"


def striped(across: bool, seed: int = 0) -> np.ndarray:
    """A noisy frame with three dark lines, across (rows) or up and down (columns), and a blob."""
    rng = np.random.default_rng(seed)
    frame = rng.normal(150, 12, (224, 224)).clip(0, 255).astype(np.uint8)
    for y in (56, 112, 168):
        frame[y - 3:y + 3, :] = 90
    cv2.circle(frame, (60, 170), 9, 40, -1)
    return frame if across else np.ascontiguousarray(np.rot90(frame))


def same_or_half_turn(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(a, b) or np.array_equal(a, np.rot90(b, 2))


def test_lines_across_stay_and_lines_up_and_down_are_turned_across():
    across, up_down = striped(True), striped(False)
    assert upright_quarter_turns(across) == 0 and turn_upright(across) is not None
    np.testing.assert_array_equal(turn_upright(across), across)
    assert upright_quarter_turns(up_down) == 1
    assert upright_quarter_turns(turn_upright(up_down)) == 0


def test_every_quarter_turn_of_a_frame_ends_as_the_frame_upright_or_its_half_turn():
    for seed in range(3):
        frame = turn_upright(np.random.default_rng(seed).integers(0, 256, (64, 64)).astype(np.uint8))
        for k in range(4):
            assert same_or_half_turn(turn_upright(np.rot90(frame, k)), frame), (seed, k)


def test_real_cells_are_already_upright_and_come_back_from_a_quarter_turn():
    """Every 4th ELPV cell (656, both cell types and all levels): the cell as it is, its busbars
    across; a quarter turn comes back as the cell or its half turn."""
    cells = elpv.read_cells()[::4]
    images = elpv.load_images(cells, 224)
    kept = [upright_quarter_turns(image) == 0 for image in images]
    dead = [c.id for c, k in zip(cells, kept) if not k]
    assert dead == [], f"cells judged turned: {dead}"
    for image in images[::10]:
        assert same_or_half_turn(turn_upright(np.rot90(image)), image)


def test_an_upright_runtime_judges_a_turned_cell_as_the_cell_and_shows_its_heat_map_turned():
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    upright, one = ModelRuntime(BUNDLE, manifest, views="upright"), ModelRuntime(BUNDLE, manifest)
    cell = elpv.load_images(elpv.read_cells()[5:6], 224)[0]
    turned = np.ascontiguousarray(np.rot90(cell, 3))          # the camera a quarter turn off
    base = one.judge(cell)
    np.testing.assert_allclose(upright.judge(turned).rewards, base.rewards, atol=1e-4)
    assert not np.allclose(one.judge(turned).rewards, base.rewards, atol=1e-2)
    ranking = list(zip(base.texts, base.rewards))
    ranking.sort(key=lambda r: -r[1])
    heat, heat_turned = one.heat_map(cell, ranking), upright.heat_map(turned, ranking)
    np.testing.assert_allclose(heat_turned, np.rot90(heat, 3), atol=1e-4)   # over the frame as shown


def test_upright2_gives_the_same_rewards_for_every_quarter_turn_of_a_cell():
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    upright2, one = ModelRuntime(BUNDLE, manifest, views="upright2"), ModelRuntime(BUNDLE, manifest)
    cell = elpv.load_images(elpv.read_cells()[7:8], 224)[0]
    base = upright2.judge(cell)
    for k in (1, 2, 3):
        np.testing.assert_allclose(upright2.judge(np.ascontiguousarray(np.rot90(cell, k))).rewards, base.rewards,
                                   atol=1e-4)
    halves = (one.judge(cell).rewards + one.judge(np.ascontiguousarray(np.rot90(cell, 2))).rewards) / 2
    np.testing.assert_allclose(base.rewards, halves, atol=1e-4)     # the mean of the cell and its half turn
