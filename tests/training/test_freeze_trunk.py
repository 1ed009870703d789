"""freeze_trunk: a stage that trains everything but the EfficientNet blocks (weights and
BatchNorm statistics), so synthetic frames cannot move the trunk the classify stage trained."""
import pytest
import torch
import yaml

from micro import MICRO_MODELS
from models.errors import ConfigError
from models.reward_model import load_model
from training.config import config_from_dict
from training.train import train

RECIPE = MICRO_MODELS.replace("frozen_blocks: 12}", "frozen_blocks: 12, level_weight: 1.0}") + """\
data: {elpv_train_limit: 16, elpv_val_limit: 8, synthetic_train: 8, synthetic_val: 4, text_pairs: 32}
stages:
  - {name: text, epochs: 1, lr: 0.003, batch_size: 8}
  - {name: classify, epochs: 1, lr: 0.003, batch_size: 8, select: level_head}
  - {name: multimodal, epochs: 1, lr: 0.003, batch_size: 8, level_loss: 0.5, freeze_trunk: FREEZE}
"""


def trunk_state(model) -> dict:
    enc = model.image_encoder
    return {k: v.clone() for k, v in enc.state_dict().items() if k.startswith(("blocks.", "stem.", "bn0."))}


@pytest.mark.parametrize("freeze", [True, False])
def test_a_frozen_trunk_stage_keeps_weights_and_batchnorm_statistics(tmp_path, freeze):
    cfg = config_from_dict(yaml.safe_load(RECIPE.replace("FREEZE", str(freeze).lower())), name="micro-freeze")
    out = tmp_path / "run"
    summary = train(cfg, out)
    before = trunk_state(load_model(out / "classify" / "model"))
    after_model = load_model(out / "multimodal" / "model")
    after = trunk_state(after_model)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    if freeze:
        assert moved == []
        assert summary["stages"][-1]["unchanged_parameters"] == []   # everything else did train
    else:   # the control: the same stage without it moves the trunk blocks it may train (12 of 16 frozen)
        assert any(k.startswith("blocks.12.") or k.startswith("blocks.15.") for k in moved), moved


def test_freeze_trunk_belongs_to_the_stages_after_classify():
    with pytest.raises(ConfigError, match="freeze_trunk is for the multimodal"):
        config_from_dict({"stages": [{"name": "classify", "freeze_trunk": True}],
                          "teacher": {"level_weight": 1.0}})
