"""Exposure normalisation (a white point in the preprocessing): the same cell seen with more or
less camera gain reaches the model as the same input, bundles without a white point are read as
they were trained, and the setting travels from the model config to the bundle in one piece."""
import json
from pathlib import Path

import numpy as np
import pytest

from models.preprocess import MAX_EXPOSURE_GAIN, PreprocessSpec, exposure_gain, normalize

ROOT = Path(__file__).resolve().parents[2]
SIZE = 64
WITH = PreprocessSpec(SIZE, white_point=185.0)
WITHOUT = PreprocessSpec(SIZE)


def _cell(seed: int = 0, top: int = 180) -> np.ndarray:
    """A bright textured frame with a dark crack, brightest pixels at `top`."""
    rng = np.random.default_rng(seed)
    frame = rng.uniform(0.6, 1.0, (SIZE, SIZE)) * top
    frame[SIZE // 3, 5:50] = 20
    return frame.astype(np.uint8)


def _gain(frame: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(frame.astype(np.float32) * gain, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("gain", [0.5, 0.7, 1.3])
def test_a_white_point_undoes_the_cameras_gain(gain):
    frame = _cell()
    same = np.abs(normalize(_gain(frame, gain), WITH) - normalize(frame, WITH)).max()
    as_seen = np.abs(normalize(_gain(frame, gain), WITHOUT) - normalize(frame, WITHOUT)).max()
    # what is left is the 8-bit rounding of the changed frame, scaled back: a few grey levels
    assert same < 4 / 255 / WITH.std / min(gain, 1), same
    assert as_seen > 10 * same


def test_without_a_white_point_frames_are_normalised_as_before():
    frame = _cell()
    expected = (frame.astype(np.float32) / 255 - WITHOUT.mean) / WITHOUT.std
    np.testing.assert_array_equal(normalize(frame, WITHOUT)[0, 0], expected)


def test_each_frame_of_a_batch_gets_its_own_gain():
    frame = _cell()
    batch = np.stack([frame, _gain(frame, 0.6), _cell(seed=1)])
    together = normalize(batch, WITH)
    for i in range(3):
        np.testing.assert_array_equal(together[i], normalize(batch[i], WITH)[0])
    assert np.abs(together[0] - together[1]).max() < 0.1


def test_the_gain_is_bounded_so_a_covered_lens_is_not_blown_up():
    black = np.zeros((1, SIZE, SIZE), np.uint8)
    dim_noise = np.random.default_rng(0).normal(6, 2, (1, SIZE, SIZE)).clip(0, 255).astype(np.uint8)
    assert exposure_gain(dim_noise, 185.0)[0] == MAX_EXPOSURE_GAIN
    at_most_4x = (np.minimum(dim_noise.astype(np.float32) * MAX_EXPOSURE_GAIN / 255, 1) - WITH.mean) / WITH.std
    np.testing.assert_allclose(normalize(dim_noise, WITH)[:, 0], at_most_4x, atol=1e-6)
    np.testing.assert_array_equal(normalize(black, WITH), normalize(black, WITHOUT))
    white = np.full((1, SIZE, SIZE), 255, np.uint8)
    assert normalize(white, WITH).max() <= (185 / 255 - WITH.mean) / WITH.std + 1e-6


def test_a_bundle_without_a_white_point_is_read_as_it_was_trained():
    manifest = json.loads((ROOT / "models" / "bundles" / "el-solar-default" / "manifest.json").read_text())
    spec = PreprocessSpec.from_dict(manifest["preprocessing"])
    assert spec.white_point is None
    assert PreprocessSpec.from_dict(WITH.to_dict()) == WITH


@pytest.mark.parametrize("value", [0, 256, -1.0])
def test_a_white_point_out_of_range_is_refused(value):
    with pytest.raises(ValueError, match="white_point"):
        PreprocessSpec(SIZE, white_point=value)


def test_the_model_config_carries_the_white_point_into_its_preprocessing():
    from models.reward_model import ModelConfig
    assert ModelConfig(image_size=64).preprocess_spec().white_point is None
    assert ModelConfig(image_size=64, white_point=185).preprocess_spec() == WITH
    for bad in (True, 300, -5, "185"):
        with pytest.raises(ValueError, match="white_point"):
            ModelConfig(white_point=bad)


def test_teacher_and_student_must_prepare_frames_alike(tmp_path):
    from models.errors import ConfigError
    from training.config import load_config
    from training.train import preprocess_spec
    path = tmp_path / "mixed.yaml"
    path.write_text("teacher: {white_point: 185}\nstudent: {}\nstages: [{name: text}]\n")
    with pytest.raises(ConfigError, match="white_point"):
        preprocess_spec(load_config(path))
