"""Every training-config value is checked for type and range when the YAML is loaded: a wrong
one is a ConfigError naming the key and a valid example, not a crash minutes into training."""
from pathlib import Path

import pytest

from models.errors import ConfigError
from training.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
TEXT = "stages: [{name: text}]\n"
MULTIMODAL = "stages: [{name: multimodal}]\n"


@pytest.mark.parametrize("text, key, example", [
    ("stages: [{name: text, lr: 3e-4}]\n", "lr", "write 0.0003"),          # YAML 1.1 reads 3e-4 as text
    ("stages: [{name: text, lr: 0}]\n", "lr", "lr: 0.001"),
    ("stages: [{name: distill, temperature: 0}]\n", "temperature", "temperature: 1.0"),
    ("stages: [{name: distill, temperature: -1}]\n", "temperature", "temperature: 1.0"),
    ("stages: [{name: distill, distill_alpha: 1.5}]\n", "distill_alpha", "between 0 and 1"),
    ("stages: [{name: distill, distill_alpha: -0.1}]\n", "distill_alpha", "between 0 and 1"),
    ("stages: [{name: multimodal, weight_decay: -0.01}]\n", "weight_decay", "weight_decay: 0.01"),
    ("stages: [{name: multimodal, centring: -1}]\n", "centring", "centring: 0.01"),
    ("stages: [{name: multimodal, epochs: 2.5}]\n", "epochs", "whole number"),
    ("stages: [{name: multimodal, batch_size: '16'}]\n", "batch_size", "write 16"),
    ("stages: [{name: multimodal, shortcut_weighting: 'no'}]\n", "shortcut_weighting", "true or false"),
    ("stages: [{name: multimodal, max_steps_per_epoch: -3}]\n", "max_steps_per_epoch", "or left out"),
    ("stages: [{name: multimodal, lr: .nan}]\n", "lr", "lr: 0.001"),
    ("stages: [{name: multimodal, select: [pairwise]}]\n", "select", "pairwise"),
    ("stages: [{name: multimodal, level_ordinal: 1.0}]\n", "level_ordinal", "set level_loss too"),
    ("stages: [{name: text, level_ordinal: 1.0}]\n", "level_ordinal", "leave it out here"),
    ("stages: [{name: classify, level_ordinal: -1}]\n", "level_ordinal", "level_ordinal: 1.0"),
    ("data: {elpv_train_limit: -5}\n" + MULTIMODAL, "elpv_train_limit", "elpv_train_limit: 400"),
    ("data: {elpv_val_limit: 0}\n" + MULTIMODAL, "elpv_val_limit", ">= 1"),
    ("data: {elpv_types: [Mono]}\n" + MULTIMODAL, "elpv_types", "elpv_types: [mono]"),
    ("data: {elpv_types: mono}\n" + MULTIMODAL, "elpv_types", "a list"),
    ("data: {elpv_types: []}\n" + MULTIMODAL, "elpv_types", "mono, poly"),
    ("data: {synthetic_train: -1}\n" + MULTIMODAL, "synthetic_train", "synthetic_train: 1200"),
    ("data: {synthetic_val: 0}\n" + MULTIMODAL, "synthetic_val", ">= 1"),
    ("data: {synthetic_on_elpv_fraction: 3}\n" + MULTIMODAL, "synthetic_on_elpv_fraction", "between 0 and 1"),
    ("data: {elpv_phrasings: 1.5}\n" + MULTIMODAL, "elpv_phrasings", "between 0 and 1"),
    ("data: {synthetic_negatives: three}\n" + MULTIMODAL, "synthetic_negatives", "synthetic_negatives: 3"),
    ("data: {use_elpv: 'yes'}\n" + MULTIMODAL, "use_elpv", "true or false"),
    ("data: {text_pairs: 0}\n" + TEXT, "text_pairs", "text_pairs: 2000"),
    ("data: [1]\n" + TEXT, "data", "must be a mapping"),
    ("seed: abc\n" + TEXT, "seed", "seed: 0"),
    ("seed: -1\n" + TEXT, "seed", "seed: 0"),
    ("threads: -1\n" + TEXT, "threads", "threads: 2"),
    ("threads: 0\n" + TEXT, "threads", "or left out"),
    ("stages: {name: text}\n", "stages", "must be a list"),
    ("- seed: 1\n", "config", "must be a mapping"),
    ("teacher: {frozen_blocks: 99}\n" + TEXT, "teacher: frozen_blocks", "from 0 to 16"),
    ("student: {d_model: 0}\n" + TEXT, "student: d_model", "at least 1"),
    ("student: {dropout: 1.5}\n" + TEXT, "student: dropout", "up to (not including) 1"),
])
def test_a_wrong_value_names_its_key_and_a_valid_example(tmp_path, text, key, example):
    bad = tmp_path / "config.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert key in str(caught.value) and example in str(caught.value), str(caught.value)


@pytest.mark.parametrize("text", [
    "stages: [{name: text, lr: 3.0e-4}]\n",
    "stages: [{name: text, lr: 0.0003, max_steps_per_epoch: 5}]\n",
    "threads: 1\nseed: 7\ndata: {elpv_types: [poly, mono], elpv_val_limit: 1, synthetic_train: 0, "
    "synthetic_val: 0, synthetic_on_elpv_fraction: 1}\n" + MULTIMODAL,
    "stages: [{name: distill, temperature: 0.5, distill_alpha: 0, weight_decay: 0, centring: 0, "
    "shortcut_weighting: false}]\n",
    "teacher: {level_weight: 1.0}\nstudent: {level_weight: 1.0}\n"
    "stages: [{name: classify, level_ordinal: 1.0}, {name: distill, level_loss: 1.0, level_ordinal: 0.5}]\n",
])
def test_valid_edge_values_still_load(tmp_path, text):
    good = tmp_path / "config.yaml"
    good.write_text(text)
    load_config(good)


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    assert load_config(path).stages


def test_settings_added_later_leave_the_hash_of_older_recipes_alone():
    """classify-224-avx2 (reports/ablation) was cross-validated before white_point and elpv_phrasings
    existed: its run directories must still be recognised as the same recipe (resume, cv reuse)."""
    from dataclasses import replace
    cfg = load_config(CONFIGS / "ablation" / "classify-224.yaml")
    assert cfg.hash() == "f5a81efec18a5d55"
    assert replace(cfg, data=replace(cfg.data, elpv_phrasings=0.5)).hash() != cfg.hash()
    ordinal = replace(cfg, stages=[replace(cfg.stages[0], level_ordinal=1.0)])
    assert ordinal.hash() != cfg.hash()


def test_the_ordinal_term_charges_a_near_miss_less_than_a_far_one():
    """A fully defective cell (level 3): mass on 2/3 costs less than mass on 1/3, which costs less
    than mass on 0 (plain cross-entropy charges all three the same)."""
    import torch
    from training.stages import ordinal_loss
    levels = torch.tensor([3])
    costs = [float(ordinal_loss(torch.eye(4)[[k]] * 20, levels)) for k in range(4)]
    assert costs[3] < costs[2] < costs[1] < costs[0]
    assert costs[1] - costs[2] == pytest.approx(costs[0] - costs[1], rel=0.05)       # about one term a step
    logits = torch.randn(8, 4, requires_grad=True)
    ordinal_loss(logits, torch.tensor([0, 1, 2, 3] * 2)).backward()
    assert logits.grad.abs().sum() > 0
    confident_miss = (torch.eye(4)[[0]] * 40).requires_grad_()       # all mass on 0 for a level-3 cell
    ordinal_loss(confident_miss, levels).backward()
    assert confident_miss.grad[0, 3] < -0.1, "a confident far miss must still be pushed toward its level"
