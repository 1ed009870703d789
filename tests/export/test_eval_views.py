"""`linejudge eval --model BUNDLE --views V` judges each ELPV frame as an appliance configured
with `views: V` does, so a station's figures (upright2 in its example config) come from the same
command as the one-view figures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from appliance.runtime import ModelRuntime
from export import verify
from models.errors import ConfigError
from training.data import elpv

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "bundles" / "el-solar-default"


@pytest.mark.parametrize("views", ["upright", "upright2"])
def test_eval_rewards_are_the_appliances_rewards_for_that_views_setting(views):
    runtime = ModelRuntime(BUNDLE, json.loads((BUNDLE / "manifest.json").read_text()), views=views)
    cells = elpv.load_images(elpv.read_cells()[3:6], runtime.spec.image_size)
    cells[1] = np.ascontiguousarray(np.rot90(cells[1]))           # a camera mounted a quarter turn off
    texts = runtime.catalog.displays
    _, rewards = verify.backend_outputs(runtime.backend, runtime.tokenizer, runtime.spec, cells, texts,
                                        views=views)
    for cell, row in zip(cells, rewards):
        judged = runtime.judge(cell)
        assert list(judged.texts) == list(texts)
        np.testing.assert_allclose(row, judged.rewards, atol=1e-4)
    _, one = verify.backend_outputs(runtime.backend, runtime.tokenizer, runtime.spec, cells, texts)
    assert not np.allclose(one[1], rewards[1], atol=1e-2), "the turned cell was judged as it is"


def test_eval_with_upright2_measures_every_turn_of_the_camera_as_no_change(tiny_bundle):
    from export.evaluate_bundle import evaluate_bundle
    one = evaluate_bundle(tiny_bundle[0], "val", limit=8, precision="int8")
    upright2 = evaluate_bundle(tiny_bundle[0], "val", limit=8, precision="int8", views="upright2")
    assert one["views"] == "one" and upright2["views"] == "upright2"
    for turn in ("quarter_turn", "half_turn", "three_quarter_turn"):
        assert upright2["robustness"]["camera_variations"][turn]["top1_agreement"] == 1.0, turn
    # the candidate sets name locations a turned view would swap: judged on the frame as it is
    assert upright2["synthetic_pairwise_accuracy"] == one["synthetic_pairwise_accuracy"]
    assert upright2["heldout_phrasing_accuracy"] == one["heldout_phrasing_accuracy"]


def test_eval_refuses_a_views_setting_the_appliance_does_not_know(tiny_bundle):
    from export.evaluate_bundle import evaluate_bundle
    with pytest.raises(ConfigError, match="views must be one of one, upright, upright2, rot4"):
        evaluate_bundle(tiny_bundle[0], "val", limit=4, views="sideways")


def test_bundle_catalog_rewards_are_what_the_appliance_scores():
    """The frame-by-frame rewards the report scripts compare bundles with (ensemble, flag-budget
    ranking) are the station's own, for its views setting."""
    from export.evaluate_bundle import bundle_catalog_rewards
    runtime = ModelRuntime(BUNDLE, json.loads((BUNDLE / "manifest.json").read_text()), views="upright2")
    rewards, data = bundle_catalog_rewards(BUNDLE, "val", views="upright2", limit=3)
    assert rewards.shape == (3, len(runtime.catalog.displays)) and len(data.levels) == 3
    for frame, row in zip(data.images, rewards):
        np.testing.assert_allclose(row, runtime.judge(frame).rewards, atol=1e-4)
