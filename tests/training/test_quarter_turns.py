"""data.quarter_turns: ELPV training frames are also turned by random quarter turns; off, nothing changes."""
from __future__ import annotations

import numpy as np
import pytest

from models.errors import ConfigError
from training.config import config_from_dict
from training.data.batches import augment


def test_quarter_turns_turn_some_frames_and_leave_the_random_stream_alone_when_off():
    frame = np.repeat((np.arange(64) * 4).astype(np.uint8)[:, None], 64, axis=1)   # constant along each row
    turned = [augment(frame, np.random.default_rng(s), flips=True, quarter_turns=True) for s in range(40)]
    across = sum(np.ptp(t[0].astype(int)) > 0 for t in turned)       # a quarter turn: the first row varies
    assert 5 <= across <= 35
    flipped = [augment(frame, np.random.default_rng(s), flips=True) for s in range(40)]
    assert all(np.ptp(t[0].astype(int)) == 0 for t in flipped)
    assert np.array_equal(augment(frame, np.random.default_rng(1), flips=True),
                          augment(frame, np.random.default_rng(1), flips=True, quarter_turns=False))
    assert np.array_equal(augment(frame, np.random.default_rng(1), flips=False, quarter_turns=True),
                          augment(frame, np.random.default_rng(1), flips=False))     # synthetic frames never


def test_the_flag_is_validated():
    stages = [{"name": "text", "epochs": 1, "lr": 0.001, "batch_size": 8}]
    assert config_from_dict({"data": {"quarter_turns": True}, "stages": stages}).data.quarter_turns is True
    with pytest.raises(ConfigError, match="quarter_turns"):
        config_from_dict({"data": {"quarter_turns": "yes"}, "stages": stages})
