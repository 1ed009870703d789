"""data.camera_changes: ELPV training frames also get one random change a camera makes
(exposure, focus, JPEG); off, the frames and the random stream are as before."""
import numpy as np
import pytest

from models.errors import ConfigError
from training.config import config_from_dict
from training.data import elpv
from training.data.batches import augment, camera_change


def _cell() -> np.ndarray:
    return elpv.load_images(elpv.read_cells()[:1], 64)[0]


def test_camera_changes_brighten_darken_blur_and_compress_some_frames_and_leave_some_alone():
    frame = _cell()
    changed = [camera_change(frame, np.random.default_rng(s)) for s in range(60)]
    assert all(c.shape == frame.shape and c.dtype == np.uint8 for c in changed)
    same = [np.array_equal(c, frame) for c in changed]
    assert 5 <= sum(same) <= 30                      # none a quarter of the time
    means = [float(c.mean()) - float(frame.mean()) for c in changed]
    assert min(means) < -10 and max(means) > 10      # darker and brighter exposures
    sharpness = [float(np.abs(np.diff(c.astype(float), axis=1)).mean()) for c in changed]
    assert min(sharpness) < 0.8 * float(np.abs(np.diff(frame.astype(float), axis=1)).mean())   # out of focus


def test_off_leaves_the_frames_and_the_random_stream_as_they_were():
    frame = _cell()
    for seed in range(5):
        before = np.random.default_rng(seed)
        after = np.random.default_rng(seed)
        assert np.array_equal(augment(frame, before, flips=True),
                              augment(frame, after, flips=True, camera_changes=False))
        assert before.random() == after.random()
    on = [augment(frame, np.random.default_rng(s), flips=True, camera_changes=True) for s in range(10)]
    off = [augment(frame, np.random.default_rng(s), flips=True) for s in range(10)]
    assert sum(not np.array_equal(a, b) for a, b in zip(on, off)) >= 5


def test_the_flag_is_validated_and_reaches_the_elpv_training_set():
    from training.train import build_data
    stages = [{"name": "text", "epochs": 1, "lr": 0.001, "batch_size": 8}]
    cfg = config_from_dict({"data": {"camera_changes": True, "elpv_train_limit": 4, "elpv_val_limit": 2,
                                     "synthetic_train": 2, "synthetic_val": 2}, "stages": stages})
    data = build_data(cfg, 64)
    assert [s.camera_changes for s in data["train"]] == [True, False]      # ELPV yes, synthetic no
    with pytest.raises(ConfigError, match="camera_changes"):
        config_from_dict({"data": {"camera_changes": "yes"}, "stages": stages})
