"""A resumed run reproduces the run done in one go, byte for byte (fixed seed, CPU)."""
import shutil
from pathlib import Path

import pytest
import torch

from training import stages
from training.config import load_config
from training.train import train
from micro import MICRO_MODELS

# text, then a two-epoch multimodal stage with the fact head (dropout and a fresh head both draw
# from torch's generator), a handful of steps each
CONFIG = """\
seed: 0
threads: 2
""" + MICRO_MODELS + """\
data: {elpv_train_limit: 8, elpv_val_limit: 4, synthetic_train: 8, synthetic_val: 4, synthetic_negatives: 3, text_pairs: 16}
stages:
  - {name: text, epochs: 1, lr: 0.003, batch_size: 8, max_steps_per_epoch: 2}
  - {name: multimodal, epochs: 2, lr: 0.003, batch_size: 8, max_steps_per_epoch: 2, fact_loss: 0.5}
"""
SAVED = ("text/model/model.safetensors", "multimodal/model/model.safetensors", "multimodal/proxy/model.safetensors")


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume_cfg") / "resume.yaml"
    path.write_text(CONFIG)
    return load_config(path)


@pytest.fixture(scope="module")
def in_one_go(cfg, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_go")
    train(cfg, out)
    return out


def _assert_same_models(a: Path, b: Path):
    for rel in SAVED:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), f"{rel} differs from the run done in one go"


def _scramble_global_rng():
    """Whatever ran before in the process must not matter."""
    torch.manual_seed(12345)
    torch.rand(1000)


def test_run_resumed_after_its_first_stage_matches_the_run_in_one_go(cfg, in_one_go, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(in_one_go / "text", out / "text")
    shutil.copy(in_one_go / "config.json", out / "config.json")
    _scramble_global_rng()
    train(cfg, out)
    _assert_same_models(in_one_go, out)


def test_run_resumed_mid_stage_matches_the_run_in_one_go(cfg, in_one_go, tmp_path, monkeypatch):
    """Stopped right after the multimodal stage's first epoch checkpoint, then started again."""
    out = tmp_path / "stopped"
    save = stages._save_checkpoint

    def save_then_stop(path, epoch, *args, **kwargs):
        save(path, epoch, *args, **kwargs)
        if Path(path).parent.name == "multimodal" and epoch == 1:
            raise Interrupted

    monkeypatch.setattr(stages, "_save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        train(cfg, out)
    monkeypatch.undo()
    assert not (out / "multimodal" / "done.json").exists()
    _scramble_global_rng()
    train(cfg, out)
    _assert_same_models(in_one_go, out)


def test_checkpoints_carry_the_random_state(in_one_go):
    for stage in ("text", "multimodal"):
        state = torch.load(in_one_go / stage / "checkpoint.pt", weights_only=False)["run_state"]
        assert {"torch", "numpy", "python"} <= set(state["rng"]), stage   # + "cuda" on GPUs
