"""Bad input ends with one clear message and a non-zero exit, never a traceback."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from models.errors import BadExplanation, BadFrame, ConfigError
from models.preprocess import check_explanation, decode_image_bytes, read_image
from training.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "linejudge_cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def test_unknown_config_key_names_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nstages: [{name: text, epochz: 3}]\n")
    with pytest.raises(ConfigError, match="epochz"):
        load_config(bad)
    result = run_cli("train", "--config", str(bad), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "epochz" in result.stderr and "Traceback" not in result.stderr


def test_unknown_model_key_and_stage(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: {layerz: 2}\nstages: [{name: text}]\n")
    with pytest.raises(ConfigError, match="layerz"):
        load_config(bad)
    bad.write_text("stages: [{name: pretrain}]\n")
    with pytest.raises(ConfigError, match="pretrain"):
        load_config(bad)


@pytest.mark.parametrize("text, problem", [
    ("data: {synthetic_negatives: 17}\nstages: [{name: text}]\n", "synthetic_negatives"),
    ("stages: [{name: text, fact_loss: 0.5}]\n", "fact_loss"),
    ("stages: [{name: multimodal, fact_loss: -1}]\n", "fact_loss"),
    ("stages: [{name: multimodal, select: loss}]\n", "select"),
    ("stages: [{name: text, select: elpv_binary}]\n", "select"),
    ("data: {use_elpv: false}\nstages: [{name: multimodal, select: elpv_binary}]\n", "use_elpv"),
])
def test_out_of_range_training_options_are_named(tmp_path, text, problem):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_config(bad)


def test_selecting_by_elpv_without_elpv_figures_is_named_before_training(tmp_path):
    """A stage run without ELPV validation figures (e.g. a fleet retraining) cannot select by them."""
    from training.config import StageConfig
    from training.stages import run_stage
    with pytest.raises(ConfigError, match="needs ELPV validation cells"):
        run_stage(StageConfig("distill", select="elpv_binary"), None, None, [], [], tmp_path, seed=0)
    assert not (tmp_path / "distill").exists()


def test_missing_and_corrupt_images(tmp_path):
    with pytest.raises(BadFrame, match="does not exist"):
        read_image(tmp_path / "nope.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(BadFrame, match="could not be decoded"):
        read_image(corrupt)
    with pytest.raises(BadFrame, match="empty"):
        decode_image_bytes(b"")


def test_empty_explanation():
    with pytest.raises(BadExplanation, match="empty"):
        check_explanation("   ")
    with pytest.raises(BadExplanation, match="characters"):
        check_explanation("x" * 100_000)


def test_checkpoint_from_another_config(tmp_path):
    from models.reward_model import STUDENT, TEACHER, ModelLoadError, RewardModel, load_model, save_model
    from dataclasses import replace
    small = replace(STUDENT, pretrained_image=False, d_model=32, text_heads=2, fusion_heads=2, text_embed_dim=8)
    save_model(RewardModel(small), tmp_path / "m")
    with pytest.raises(ModelLoadError, match="different model config"):
        load_model(tmp_path / "m", expect=STUDENT)
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_model(tmp_path / "m")


def test_eval_of_a_missing_model_is_one_line(tmp_path):
    result = run_cli("eval", "--model", str(tmp_path / "nothing"), "--json", str(tmp_path / "x.json"))
    assert result.returncode == 2
    assert "holds no trained model" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("text, key", [
    ("stages: [{name: text, lr: 3e-4}]\n", "lr"),              # YAML 1.1 reads 3e-4 as text
    ("data: [1]\nstages: [{name: text}]\n", "data"),            # was an AttributeError traceback
    ("data: {elpv_types: [Mono]}\nstages: [{name: multimodal}]\n", "elpv_types"),
])
def test_a_wrong_config_value_is_one_line_from_train(tmp_path, text, key):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = run_cli("train", "--config", str(bad), "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert key in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["-3", "0", "lots"])
def test_eval_limit_must_be_a_positive_whole_number(tmp_path, value):
    result = run_cli("eval", "--model", str(tmp_path), "--json", str(tmp_path / "x.json"), "--limit", value)
    assert result.returncode == 2
    assert "--limit" in result.stderr and "at least 1" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_refuses_a_limit_below_one(tmp_path):
    from training.evaluate import evaluate
    with pytest.raises(ConfigError, match="at least 1"):
        evaluate(tmp_path, "val", limit=0)
