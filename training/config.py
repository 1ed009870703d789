"""Training configuration: frozen dataclasses, validated when the YAML is loaded."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from models.common import is_number, is_whole, read_yaml
from models.errors import ConfigError
from models.reward_model import STUDENT, TEACHER, ModelConfig

STAGE_NAMES = ("text", "classify", "multimodal", "distill", "fleet")
SELECT_BY = {"pairwise": "val_pairwise_accuracy", "elpv_binary": "val_elpv_binary_accuracy",
             "level_head": "val_level_head_binary_accuracy"}
FLEET_STAGES = ("fleet", "distill")   # `linejudge hq retrain` configs: exactly these, in order
ELPV_TYPES = ("mono", "poly")
ADDED_LATER = (("teacher", "white_point"), ("student", "white_point"), ("data", "elpv_phrasings"))
STAGE_ADDED_LATER = ("level_ordinal",)


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
    quarter_turns: bool = False           # ELPV training frames also turned by random quarter turns
    camera_changes: bool = False          # ELPV training frames also exposed, blurred or JPEG-compressed at random
    elpv_phrasings: float = 0.0           # share of ELPV training texts composed from the facts (training/data/elpv_phrasings.py)

    def __post_init__(self):
        _flag("data", "use_elpv", self.use_elpv)
        _flag("data", "quarter_turns", self.quarter_turns)
        _flag("data", "camera_changes", self.camera_changes)
        _whole("data", "elpv_train_limit", self.elpv_train_limit, 1, 400,
               none="for the whole train part; use_elpv: false trains without ELPV")
        _whole("data", "elpv_val_limit", self.elpv_val_limit, 1, 120, none="for the whole val part")
        self._check_types()
        _whole("data", "synthetic_train", self.synthetic_train, 0, 1200)
        _whole("data", "synthetic_val", self.synthetic_val, 1 if self.synthetic_train else 0, 300)
        _number("data", "synthetic_on_elpv_fraction", self.synthetic_on_elpv_fraction, 0.0, 1.0, 0.5)
        _number("data", "elpv_phrasings", self.elpv_phrasings, 0.0, 1.0, 0.5)
        _whole("data", "text_pairs", self.text_pairs, 1, 2000)
        if not is_whole(self.synthetic_negatives) or not 1 <= self.synthetic_negatives <= 16:
            raise ConfigError("data.synthetic_negatives must be between 1 and 16 "
                              f"(a defect has 16 one-fact changes), e.g. synthetic_negatives: 3; "
                              f"got {self.synthetic_negatives!r}")

    def _check_types(self) -> None:
        types = self.elpv_types
        if (not isinstance(types, tuple) or not types or len(set(map(str, types))) != len(types)
                or not all(isinstance(t, str) and t in ELPV_TYPES for t in types)):
            raise ConfigError(f"data.elpv_types must be a list of distinct cell types from "
                              f"{', '.join(ELPV_TYPES)} (lower case), e.g. elpv_types: [mono]; "
                              f"got {list(types) if isinstance(types, tuple) else types!r}")


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
    level_loss: float = 0.0           # multimodal/distill: weight of the ELPV level cross-entropy
                                      # (the model's level heads; needs model level_weight > 0)
    level_ordinal: float = 0.0        # weight of the ordinal term on the image level head: binary
                                      # cross-entropy of P(level >= k), k = 1..3 (k = 2: the binary verdict)
    freeze_trunk: bool = False        # multimodal/distill: the EfficientNet blocks keep their weights and
                                      # BatchNorm statistics (the classify stage's trunk, untouched by synthetic frames)
    max_steps_per_epoch: int | None = None
    select: str = "pairwise"          # which epoch is kept: best val pairwise accuracy, or
                                      # best val ELPV binary accuracy ("elpv_binary", image stages)

    def __post_init__(self):
        if self.name not in STAGE_NAMES:
            raise ConfigError(f"unknown stage {self.name!r}; stages are {', '.join(STAGE_NAMES)}")
        where = f"stage {self.name}"
        _whole(where, "epochs", self.epochs, 1, 3)
        _whole(where, "batch_size", self.batch_size, 1, 16)
        _whole(where, "max_steps_per_epoch", self.max_steps_per_epoch, 1, 200, none="for whole epochs")
        _number(where, "lr", self.lr, 0.0, None, 0.001, above=True)
        _number(where, "weight_decay", self.weight_decay, 0.0, None, 0.01)
        _number(where, "centring", self.centring, 0.0, None, 0.01)
        _number(where, "temperature", self.temperature, 0.0, None, 1.0, above=True)
        _number(where, "distill_alpha", self.distill_alpha, 0.0, 1.0, 0.7)
        _flag(where, "shortcut_weighting", self.shortcut_weighting)
        _flag(where, "freeze_trunk", self.freeze_trunk)
        if self.freeze_trunk and self.name in ("text", "classify"):
            raise ConfigError(f"stage {self.name}: freeze_trunk is for the multimodal, distill and fleet stages "
                              f"(the classify stage is what trains the trunk); leave it out here")
        _number(where, "fact_loss", self.fact_loss, 0.0, None, 0.5)
        _number(where, "level_loss", self.level_loss, 0.0, None, 0.5)
        _number(where, "level_ordinal", self.level_ordinal, 0.0, None, 1.0)
        if self.level_ordinal and (self.name == "text" or (self.name != "classify" and not self.level_loss)):
            raise ConfigError(f"stage {self.name}: level_ordinal adds to the level cross-entropy, which this stage "
                              f"does not train" + ("; leave it out here" if self.name == "text" else
                                                   ": set level_loss too, or remove level_ordinal"))
        for key in ("fact_loss", "level_loss"):
            if getattr(self, key) and self.name in ("text", "classify"):
                raise ConfigError(f"stage {self.name}: {key} is for the multimodal, distill and fleet stages "
                                  f"(the classify stage trains the level heads alone); leave it out here")
        if not isinstance(self.select, str) or self.select not in SELECT_BY or (
                self.select != "pairwise" and self.name not in ("classify", "multimodal", "distill")):
            raise ConfigError(f"stage {self.name}: select must be one of {', '.join(SELECT_BY)} "
                              f"(elpv_binary and level_head are for the classify, multimodal and distill stages), "
                              f"got {self.select!r}")


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
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"name must be a non-empty text, e.g. name: tiny; got {self.name!r}")
        _whole("", "seed", self.seed, 0, 0)
        _whole("", "threads", self.threads, 1, 2, none="for torch's default")
        names = [s.name for s in self.stages]
        if not names:
            raise ConfigError("a training config needs at least one stage")
        if len(set(names)) != len(names):
            raise ConfigError(f"each stage may appear once, got {names}")
        if "fleet" in names and tuple(names) != FLEET_STAGES:
            raise ConfigError(f"a fleet retraining config has exactly the stages {list(FLEET_STAGES)}, got {names}")
        if "distill" in names and names[-1] != "distill":
            raise ConfigError("distill must be the last stage (it needs the finished teacher)")
        if any(s.select != "pairwise" for s in self.stages) and not self.data.use_elpv:
            raise ConfigError("select: elpv_binary and level_head need ELPV validation cells: set data.use_elpv: true")
        self._check_level_heads(names)

    def _check_level_heads(self, names: list[str]) -> None:
        """The classify stage and level_loss train the models' level heads, so those must exist;
        classify comes after text (blank frames would move its BatchNorm statistics) and before multimodal."""
        if "classify" in names:
            at = names.index("classify")
            if not self.data.use_elpv:
                raise ConfigError("the classify stage learns the ELPV levels: set data.use_elpv: true")
            if ("text" in names and names.index("text") > at) or ("multimodal" in names and names.index("multimodal") < at):
                raise ConfigError(f"classify must come after text and before multimodal, got {names}")
        uses = lambda s: s.level_loss or s.name == "classify" or s.select == "level_head"   # noqa: E731
        needs = {"teacher": any(s.name != "distill" and uses(s) for s in self.stages),
                 "student": any(s.name == "distill" and uses(s) for s in self.stages)}
        for role, needed in needs.items():
            if needed and not getattr(self, role).level_weight:
                raise ConfigError(f"{role}: level_weight must be > 0 (e.g. level_weight: 1.0) for the classify "
                                  f"stage and level_loss: they train the model's level heads")

    def hash(self) -> str:
        """Identifies the recipe of a run directory (a run of another recipe is refused there).
        Settings added since 2026-12-07 count only when set, so the runs and cross-validations
        made before them keep their hash and can be resumed."""
        data = asdict(self)
        for section, key in ADDED_LATER:
            if data[section][key] == 0:
                del data[section][key]
        for stage in data["stages"]:
            for key in STAGE_ADDED_LATER:
                if stage[key] == 0:
                    del stage[key]
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)


def _whole(where: str, key: str, value, least: int, example: int, none: str | None = None) -> None:
    """A whole number >= least; None too where `none` says what leaving it out means."""
    if value is None and none:
        return
    if not is_whole(value) or value < least:
        left_out = f" (or left out {none})" if none else ""
        raise ConfigError(f"{_key(where, key)} must be a whole number >= {least}{left_out}, "
                          f"e.g. {key}: {example}; got {value!r}{_text_hint(value)}")


def _number(where: str, key: str, value, low: float, high: float | None, example: float,
            above: bool = False) -> None:
    """A finite number in [low, high] ((low, high] with above=True; no upper end for high=None)."""
    fits = is_number(value) and (value > low if above else value >= low) and (high is None or value <= high)
    if not fits:
        span = f"> {low:g}" if above else f">= {low:g}"
        span = f"between {low:g} and {high:g}" if high is not None else span
        raise ConfigError(f"{_key(where, key)} must be a number {span}, e.g. {key}: {example}; "
                          f"got {value!r}{_text_hint(value)}")


def _flag(where: str, key: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{_key(where, key)} must be true or false, e.g. {key}: true; got {value!r}")


def _key(where: str, key: str) -> str:
    if not where:
        return key
    return f"{where}.{key}" if where == "data" else f"{where}: {key}"


def _text_hint(value) -> str:
    """YAML 1.1 (PyYAML) reads 3e-4 as text: a float needs a dot and a signed exponent (3.0e-4).
    Such text is refused, not converted, so the file means what every YAML reader reads."""
    if not isinstance(value, str):
        return ""
    try:
        number = float(value)
    except ValueError:
        return ""
    plain = f"{number:g}" if number.is_integer() else repr(number)
    return (f" (YAML reads {value} as text, not a number: write {plain}; an exponent needs a dot "
            f"and a sign, as in 3.0e-4)")


def _model(base: ModelConfig, data: dict, where: str) -> ModelConfig:
    try:
        return replace(base, **_check_keys(ModelConfig, data, where))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _build(cls, data: dict, where: str):
    _check_keys(cls, data, where)
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def config_from_dict(data: dict, name: str = "config") -> TrainConfig:
    data = dict(_check_keys(TrainConfig, {} if data is None else data, name))
    teacher = _model(TEACHER, data.pop("teacher", {}), f"{name}: teacher")
    student = _model(STUDENT, data.pop("student", {}), f"{name}: student")
    data_cfg = _build(DataConfig, _tuples(_check_keys(DataConfig, data.pop("data", None) or {}, f"{name}: data")),
                      f"{name}: data")
    stages = data.pop("stages", None) or []
    if not isinstance(stages, list):
        raise ConfigError(f"{name}: stages must be a list of mappings, e.g. stages: [{{name: text, epochs: 1}}]; "
                          f"got {type(stages).__name__}")
    stages = tuple(_build(StageConfig, s, f"{name}: stages[{i}]") for i, s in enumerate(stages))
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
    data = read_yaml(path, "config", "see training/configs/ for examples")
    return config_from_dict(data or {}, name=Path(path).stem)
