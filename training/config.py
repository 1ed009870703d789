"""Training configuration: frozen dataclasses, validated when the YAML is loaded."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from appliance.errors import ConfigError
from models.reward_model import STUDENT, TEACHER, ModelConfig

STAGE_NAMES = ("text", "multimodal", "distill", "fleet")
SELECT_BY = {"pairwise": "val_pairwise_accuracy", "elpv_binary": "val_elpv_binary_accuracy"}
FLEET_STAGES = ("fleet", "distill")   # `linejudge hq retrain` configs: exactly these, in order


@dataclass(frozen=True)
class DataConfig:
    elpv_train_limit: int | None = None   # None = the whole train part
    elpv_val_limit: int | None = None
    elpv_types: tuple[str, ...] = ("mono", "poly")   # cross-distribution runs train on one
    use_elpv: bool = True
    synthetic_train: int = 1200
    synthetic_val: int = 300
    synthetic_on_elpv_fraction: float = 0.5          # rest on procedural textures
    synthetic_negatives: int = 3          # hard negatives per training frame (<= 16); val keeps 3
    text_pairs: int = 2000

    def __post_init__(self):
        if not 1 <= self.synthetic_negatives <= 16:
            raise ConfigError("data.synthetic_negatives must be between 1 and 16 "
                              "(a defect has 16 one-fact changes)")


@dataclass(frozen=True)
class StageConfig:
    name: str
    epochs: int = 1
    lr: float = 3e-4
    batch_size: int = 32
    weight_decay: float = 0.01
    centring: float = 0.01            # TRL-style reward centring coefficient
    shortcut_weighting: bool = True   # multimodal: arXiv 2503.03122 pair weights
    temperature: float = 1.0          # distill: softmax temperature
    distill_alpha: float = 0.7        # distill: weight of the teacher term vs true pairs
    fact_loss: float = 0.0           # multimodal/distill: weight of the training-only fact head
                                      # (synthetic frames' type, cell, severity from the patches)
    max_steps_per_epoch: int | None = None
    select: str = "pairwise"          # which epoch is kept: best val pairwise accuracy, or
                                      # best val ELPV binary accuracy ("elpv_binary", image stages)

    def __post_init__(self):
        if self.name not in STAGE_NAMES:
            raise ConfigError(f"unknown stage {self.name!r}; stages are {', '.join(STAGE_NAMES)}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"stage {self.name}: epochs, batch_size and lr must be positive")
        if self.fact_loss < 0 or (self.fact_loss and self.name == "text"):
            raise ConfigError(f"stage {self.name}: fact_loss must be >= 0 and is for image stages only")
        if self.select not in SELECT_BY or (self.select != "pairwise" and self.name not in ("multimodal", "distill")):
            raise ConfigError(f"stage {self.name}: select must be one of {', '.join(SELECT_BY)} "
                              f"(elpv_binary is for the multimodal and distill stages), got {self.select!r}")


@dataclass(frozen=True)
class TrainConfig:
    name: str
    seed: int = 0
    threads: int | None = None
    teacher: ModelConfig = TEACHER
    student: ModelConfig = STUDENT
    data: DataConfig = field(default_factory=DataConfig)
    stages: tuple[StageConfig, ...] = ()

    def __post_init__(self):
        names = [s.name for s in self.stages]
        if not names:
            raise ConfigError("a training config needs at least one stage")
        if len(set(names)) != len(names):
            raise ConfigError(f"each stage may appear once, got {names}")
        if "fleet" in names and tuple(names) != FLEET_STAGES:
            raise ConfigError(f"a fleet retraining config has exactly the stages {list(FLEET_STAGES)}, got {names}")
        if "distill" in names and names[-1] != "distill":
            raise ConfigError("distill must be the last stage (it needs the finished teacher)")
        if any(s.select == "elpv_binary" for s in self.stages) and not self.data.use_elpv:
            raise ConfigError("select: elpv_binary needs ELPV validation cells: set data.use_elpv: true")

    def hash(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


def _build(cls, data: dict, where: str):
    _check_keys(cls, data, where)
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def config_from_dict(data: dict, name: str = "config") -> TrainConfig:
    data = dict(data or {})
    _check_keys(TrainConfig, data, name)
    try:
        teacher = replace(TEACHER, **_check_keys(ModelConfig, data.pop("teacher", {}), f"{name}: teacher"))
        student = replace(STUDENT, **_check_keys(ModelConfig, data.pop("student", {}), f"{name}: student"))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None
    data_cfg = _build(DataConfig, _tuples(data.pop("data", {})), f"{name}: data")
    stages = tuple(_build(StageConfig, s, f"{name}: stages[{i}]")
                   for i, s in enumerate(data.pop("stages", None) or []))
    data.setdefault("name", name)
    try:
        return TrainConfig(teacher=teacher, student=student, data=data_cfg, stages=stages, **data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from None


def _check_keys(cls, data: dict, where: str) -> dict:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key{'s' if len(unknown) > 1 else ''} in {where}: "
                          f"{', '.join(unknown)} (allowed: {', '.join(sorted(known))})")
    return data


def _tuples(data: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in (data or {}).items()}


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config {path} does not exist; see training/configs/ for examples")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    return config_from_dict(data or {}, name=path.stem)
