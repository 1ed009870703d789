"""`linejudge train`: build the data, run the configured stages in order, save every model.

Run directory layout:
    config.json        the resolved config and its hash (a run resumes only with the same one)
    train_ids.json     every ELPV cell id that reached training (never a test cell)
    text/ classify/ multimodal/ distill/   per stage: checkpoint.pt, done.json, model/ (+ proxy/)
    summary.json       per-stage metrics, parameter counts, timings
"""
from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from models.common import write_file_atomic
from models.errors import ConfigError, LinejudgeError
from models.platform import cpu_flags, cpu_model
from models.preprocess import PreprocessSpec
from models.reward_model import RewardModel
from training import distributed
from training.config import TrainConfig
from training.data import elpv
from training.data.batches import CandidateSet, ElpvSet, elpv_set, synthetic_set
from training.data.text_pairs import train_val_pairs
from training.evaluate import elpv_binary_accuracy, level_head_figures
from training.stages import Encoder, run_stage


class TestLeakError(LinejudgeError):
    """An ELPV test cell was about to reach training."""


class TextPairSet(CandidateSet):
    """Text-only pairs; the frame is blank in the text stage, so no pixels are stored."""
    flippable = False

    def __init__(self, name: str, pairs: list[tuple[str, str]], size: int):
        super().__init__(name, np.broadcast_to(np.zeros((1, size, size), np.uint8), (len(pairs), size, size)),
                         [f"{name}-{i}" for i in range(len(pairs))])
        self.pairs = pairs

    def texts(self, i, rng, heldout=False, display=False):
        return list(self.pairs[i])


def preprocess_spec(cfg: TrainConfig) -> PreprocessSpec:
    if cfg.teacher.preprocess_spec() != cfg.student.preprocess_spec():
        raise ConfigError("teacher and student must share image_size, max_tokens and white_point "
                          "(the appliance preprocesses once per frame)")
    return cfg.student.preprocess_spec()


def build_data(cfg: TrainConfig, size: int, fold: tuple[int, int] | None = None) -> dict[str, list[CandidateSet]]:
    """The training and validation sets; `fold` (k, folds) takes the ELPV cells from fold k of a
    cross-validation over train + val (elpv.cv_split) instead of the fixed split."""
    d = cfg.data
    train, val = [], []
    if d.use_elpv:
        train.append(elpv_set("train", size, d.elpv_train_limit, d.elpv_types, cfg.seed, fold))
        train[-1].quarter_turns = d.quarter_turns
        train[-1].camera_changes = d.camera_changes
        train[-1].use_phrasings(d.elpv_phrasings, cfg.seed)
        val.append(elpv_set("val", size, d.elpv_val_limit, d.elpv_types, cfg.seed, fold))
    backgrounds = elpv.defect_free_backgrounds(size, fold=fold) if d.synthetic_on_elpv_fraction > 0 else None
    if d.synthetic_train:
        train.append(synthetic_set("synthetic-train", d.synthetic_train, size, cfg.seed + 1,
                                   d.synthetic_on_elpv_fraction, backgrounds, d.synthetic_negatives))
        val.append(synthetic_set("synthetic-val", d.synthetic_val, size, cfg.seed + 2,
                                 d.synthetic_on_elpv_fraction, backgrounds))
    # validation holds no pair that is also a training pair (the training pairs are as before)
    train_pairs, val_pairs = train_val_pairs(np.random.default_rng(cfg.seed + 3), d.text_pairs,
                                             max(d.text_pairs // 10, 20))
    text_train = TextPairSet("text-train", train_pairs, size)
    text_val = TextPairSet("text-val", val_pairs, size)
    if not train:
        raise ConfigError("the data section selects no image data: enable use_elpv or synthetic_train")
    return {"train": train, "val": val, "text_train": [text_train], "text_val": [text_val]}


def check_no_test_cells(sets: list[CandidateSet]) -> list[str]:
    """Every ELPV id headed for training, after checking none is a test cell."""
    test_ids = set(elpv.load_split()["test"])
    used = sorted({i for s in sets for i in s.ids if i.startswith("cell")})
    leaked = test_ids.intersection(used)
    if leaked:
        raise TestLeakError(f"{len(leaked)} ELPV test cells reached training, e.g. {sorted(leaked)[:3]}")
    return used


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def claim_run_dir(cfg: TrainConfig, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = out / "config.json"
    if record.exists():
        previous = json.loads(record.read_text())
        if previous.get("hash") != cfg.hash():
            raise ConfigError(f"{out} holds a run of another config ({previous.get('name')}, "
                              f"hash {previous.get('hash')}); use a new --out directory")
    elif distributed.is_main():      # atomic: another rank reading it sees it whole or not at all
        write_file_atomic(record, (json.dumps({"name": cfg.name, "hash": cfg.hash(), "config": cfg.to_dict()},
                                              indent=2, default=str) + "\n").encode())


def copy_image_trunk(teacher: RewardModel, student: RewardModel) -> None:
    """The student starts from the teacher's fine-tuned EfficientNet trunk."""
    s, t = student.image_encoder, teacher.image_encoder
    for name in ("stem", "bn0", "blocks"):
        getattr(s, name).load_state_dict(getattr(t, name).state_dict())


def train(cfg: TrainConfig, out: str | Path, fold: tuple[int, int] | None = None) -> dict:
    """Run every stage of cfg into out (resuming where it stopped); fold: a cross-validation fold
    (training/cv.py) instead of the fixed train/val split."""
    out = Path(out)
    if any(s.name == "fleet" for s in cfg.stages):
        raise ConfigError(f"{cfg.name} is a fleet retraining config: run it with `linejudge hq retrain`")
    distributed.init()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    claim_run_dir(cfg, out)
    seed_everything(cfg.seed)
    spec = preprocess_spec(cfg)
    enc = Encoder(spec)
    started = time.time()
    print(f"building data for {cfg.name} ...", flush=True)
    data = build_data(cfg, spec.image_size, fold)
    used = check_no_test_cells(data["train"] + data["val"])
    if distributed.is_main():
        (out / "train_ids.json").write_text(json.dumps({"elpv_ids": used}) + "\n")
    teacher = RewardModel(cfg.teacher)
    proxy = student = None
    summary = {"config": cfg.name, "config_hash": cfg.hash(), "stages": [],
               **({"cv_fold": list(fold)} if fold is not None else {}),
               "sizes": {k: len(v) for k, v in ((s.name, s) for s in data["train"] + data["val"])}}
    elpv_val = elpv_val_figures(data["val"], enc)
    for stage in cfg.stages:
        if stage.name == "text":
            metrics = run_stage(stage, teacher, enc, data["text_train"], data["text_val"], out, cfg.seed)
            proxy = copy.deepcopy(teacher)
        elif stage.name == "classify":
            cells = [d for d in data["train"] if isinstance(d, ElpvSet)]
            metrics = run_stage(stage, teacher, enc, cells, [d for d in data["val"] if isinstance(d, ElpvSet)],
                                out, cfg.seed, val_extra=elpv_val)
        elif stage.name == "multimodal":
            proxy = proxy if proxy is not None else copy.deepcopy(teacher)
            metrics = run_stage(stage, teacher, enc, data["train"], data["val"], out, cfg.seed, proxy=proxy,
                                val_extra=elpv_val)
        else:
            torch.manual_seed(cfg.seed + 7)
            student = RewardModel(cfg.student)
            copy_image_trunk(teacher, student)
            if hasattr(student.text_encoder, "init_from_minilm"):
                student.text_encoder.init_from_minilm(_minilm_word_embeddings())
            teacher.eval()
            metrics = run_stage(stage, student, enc, data["train"], data["val"], out, cfg.seed, teacher=teacher,
                                val_extra=elpv_val)
        summary["stages"].append({k: v for k, v in metrics.items() if k != "config"})
    summary["parameters"] = {"teacher": teacher.parameter_count(),
                             "student": student.parameter_count() if student else None}
    summary["minutes"] = round((time.time() - started) / 60, 2)
    # minutes and, through torch's float kernels, the figures too differ from CPU to CPU
    summary["platform"] = {"cpu": cpu_model(), "isa": cpu_flags(), "torch": torch.__version__}
    if distributed.is_main():
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def elpv_val_figures(val_sets, enc: Encoder):
    """model -> {"val_elpv_binary_accuracy": ...} on the ELPV validation cells, if there are any
    (and the image level head's own figure where the model has one)."""
    cells = [s for s in val_sets if isinstance(s, ElpvSet)]
    if not cells:
        return None

    def figures(model: RewardModel) -> dict:
        out = {"val_elpv_binary_accuracy": elpv_binary_accuracy(model, enc, cells[0])}
        if model.scorer.level_weight:
            out.update(level_head_figures(model, enc, cells[0]))
        return out
    return figures


def _minilm_word_embeddings() -> torch.Tensor:
    from models.reward_model import _minilm
    return _minilm().embeddings.word_embeddings.weight.detach().clone()
