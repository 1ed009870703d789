"""Appliance configuration: one YAML file -> a frozen, validated dataclass."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from appliance.decide import FLAG_BUDGETS, OPTIONAL_THRESHOLDS, THRESHOLD_NAMES
from appliance.reject_signal import RejectSignalConfig, reject_signal_from_dict
from appliance.review_budget import ReviewPolicy, policy_from_dict
from models.common import is_number, is_whole, read_yaml
from models.errors import ConfigError
from models.preprocess import VIEWS

GOLDEN_POLICIES = ("fp32", "refuse")     # on_golden_failure (appliance/runtime.open_checked_runtime)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUNDLE = ROOT / "models" / "bundles" / "el-solar-default"
DEFAULT_KEYS = ROOT / "models" / "keys"
PROBABILITY_THRESHOLDS = ("p_best", "p_defect", "p_best_free_text")
ELPV_SPLITS = ("train", "val", "test")     # training/data/elpv_split.json
# About one part a minute for the operator, each at most two minutes old; camera parts only.
DEFAULT_REVIEW = ReviewPolicy(cap_per_hour=60, max_age_s=120)


@dataclass(frozen=True)
class ApplianceConfig:
    state_dir: Path = Path("state")
    bundle: Path = DEFAULT_BUNDLE           # the bundle to start with if none is installed
    trusted_keys: tuple[Path, ...] = ()     # empty = models/keys/*.pub
    line: str = "el-solar"
    station: str = "station-1"
    source: str = "elpv:test"               # camera: USB index, /dev/videoN, URL, GStreamer, file, folder
    max_fps: float = 10.0
    backend: str = "onnxruntime"            # or "tensorrt"
    providers: tuple[str, ...] = ("cpu",)   # e.g. ["tensorrt", "cuda", "cpu"]
    allow_provider_fallback: bool = False
    on_golden_failure: str = "fp32"         # INT8 graphs fail the golden check: "fp32" graphs (if they pass) or "refuse"
    threads: int | None = None              # encoder threads; None = all cores but one (see scoring_threads)
    views: str = "one"                      # "upright": a solar cell turned so its busbars run across;
                                            # "upright2": rewards of that and its half turn averaged;
                                            # "rot4": rewards averaged over the frame's four quarter turns
    thresholds: dict = field(default_factory=dict)   # overrides of the manifest's defaults
    flag_budget: float | None = None        # share of parts the operator can review, e.g. 0.25: the
                                            # bundle's p_best and p_defect derived for it (fewest escapes)
    host: str = "127.0.0.1"
    port: int = 7860
    save_frames: bool = True
    frame_budget_mb: float = 500.0
    retention_days: float = 30.0
    hq_url: str | None = None
    hq_token_file: Path | None = None
    sync_interval_s: float = 300.0          # in-process sync with HQ every this many seconds; 0 = off
    commit_after_inspections: int = 20      # a hot-swapped model is kept after this many healthy inspections
    commit_timeout_s: float = 60.0          # ... within this time, else the old model is swapped back
    operator_pins: dict = field(default_factory=dict)  # name -> PIN, hashed into the store on start
    review: ReviewPolicy = DEFAULT_REVIEW               # the review budget (appliance/review_budget.py)
    operator_idle_logout_s: float = 600.0               # an operator is logged out after this long without a tap
    reject_signal: RejectSignalConfig | None = None      # each outcome to the line's PLC (appliance/reject_signal.py)

    def __post_init__(self):
        if not is_number(self.max_fps) or self.max_fps <= 0:
            raise ConfigError(f"max_fps must be a positive number, not {self.max_fps!r}")
        if not is_whole(self.port) or not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is not a TCP port")
        if self.backend not in ("onnxruntime", "tensorrt"):
            raise ConfigError(f"backend must be onnxruntime or tensorrt, not {self.backend!r}")
        if self.views not in VIEWS:
            raise ConfigError(f"views must be {', '.join(VIEWS)}, not {self.views!r}: upright turns a solar cell so "
                              "its busbars run across (a camera mounted a quarter turn off), upright2 averages that "
                              "and its half turn (2x the image cost), rot4 the four quarter turns (4x)")
        if self.on_golden_failure not in GOLDEN_POLICIES:
            raise ConfigError(f"on_golden_failure must be {' or '.join(GOLDEN_POLICIES)}, not "
                              f"{self.on_golden_failure!r}: fp32 inspects with the bundle's fp32 graphs when "
                              "its INT8 graphs fail the golden-set check, refuse stops the appliance")
        self._check_thresholds()
        self._check_flag_budget()
        self._check_storage()
        self._check_types()
        self._check_sync()

    def _check_thresholds(self) -> None:
        if not isinstance(self.thresholds, dict):
            raise ConfigError(f"thresholds must be a mapping, e.g. thresholds: {{p_defect: 0.2}}, "
                              f"not {self.thresholds!r}")
        unknown = set(self.thresholds) - set(THRESHOLD_NAMES)
        if unknown:
            raise ConfigError(f"unknown thresholds {sorted(unknown)}; use {', '.join(THRESHOLD_NAMES)}")
        for name, value in self.thresholds.items():
            if value is None and name in OPTIONAL_THRESHOLDS:
                continue                      # null turns an optional check off
            if value is None:
                raise ConfigError(f"thresholds: {name} cannot be null; remove the line to use the bundle's value")
            if not is_number(value) or value < 0 or (name in PROBABILITY_THRESHOLDS and value > 1):
                limits = "between 0 and 1" if name in PROBABILITY_THRESHOLDS else "0 or more"
                raise ConfigError(f"thresholds: {name} must be a number {limits}, not {value!r}")

    def _check_flag_budget(self) -> None:
        if self.flag_budget is not None:
            if not is_number(self.flag_budget) or self.flag_budget not in FLAG_BUDGETS:
                raise ConfigError(f"flag_budget is the share of parts the operator can review, one of "
                                  f"{', '.join(str(b) for b in FLAG_BUDGETS)} (or left out), not {self.flag_budget!r}")
            both = sorted({"p_best", "p_defect"} & set(self.thresholds))
            if both:
                raise ConfigError(f"flag_budget chooses p_best and p_defect for the budget; remove {', '.join(both)} "
                                  f"from thresholds, or remove flag_budget to set them yourself")

    def _check_storage(self) -> None:
        for name in ("frame_budget_mb", "retention_days"):
            value = getattr(self, name)
            if not is_number(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive number, not {value!r}")
        if self.threads is not None and (not is_whole(self.threads) or self.threads < 1):
            raise ConfigError(f"threads must be a whole number of at least 1 (or left out), not {self.threads!r}")
        if isinstance(self.source, str) and self.source.startswith("elpv:") \
                and self.source.split(":", 1)[1] not in ELPV_SPLITS:
            raise ConfigError(f"source {self.source!r}: the ELPV replay splits are "
                              f"{', '.join('elpv:' + s for s in ELPV_SPLITS)}")

    def _check_types(self) -> None:
        for name in ("save_frames", "allow_provider_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, not {getattr(self, name)!r}")
        if not isinstance(self.operator_pins, dict):
            raise ConfigError(f'operator_pins must be a mapping of names to quoted PINs, e.g. '
                              f'operator_pins: {{alice: "4711"}}, not {self.operator_pins!r}')
        for name, pin in self.operator_pins.items():
            if not isinstance(pin, str):
                raise ConfigError(f"operator_pins: the PIN of {name} must be quoted, e.g. {name}: \"0427\" "
                                  "(unquoted, YAML drops leading zeros or reads them as octal)")

    def _check_seconds(self, name: str, example: float) -> None:
        value = getattr(self, name)
        if not is_number(value) or value <= 0:
            raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}; e.g. {name}: {example:g}")

    def _check_sync(self) -> None:
        if not is_number(self.sync_interval_s) or self.sync_interval_s < 0:
            raise ConfigError(f"sync_interval_s must be 0 (no in-process sync) or a number of seconds, "
                              f"not {self.sync_interval_s!r}; e.g. sync_interval_s: 300")
        self._check_seconds("operator_idle_logout_s", 600)
        if not is_whole(self.commit_after_inspections) or self.commit_after_inspections < 1:
            raise ConfigError(f"commit_after_inspections must be a whole number of at least 1, not "
                              f"{self.commit_after_inspections!r}; e.g. commit_after_inspections: 20")
        self._check_seconds("commit_timeout_s", 60)
        needed_s = self.commit_after_inspections / self.max_fps
        if self.hq_url and self.sync_interval_s > 0 and needed_s >= self.commit_timeout_s:
            raise ConfigError(f"a new model needs commit_after_inspections={self.commit_after_inspections} "
                              f"inspections, at least {needed_s:g} s at max_fps={self.max_fps:g}, but "
                              f"commit_timeout_s is {self.commit_timeout_s:g} s; raise commit_timeout_s")

    @property
    def db_path(self) -> Path:
        return Path(self.state_dir) / "appliance.db"

    @property
    def frames_dir(self) -> Path:
        return Path(self.state_dir) / "frames"

    @property
    def bundles_dir(self) -> Path:
        return Path(self.state_dir) / "bundles"

    def key_files(self) -> list[Path]:
        return list(self.trusted_keys) or sorted(DEFAULT_KEYS.glob("*.pub"))


PATH_FIELDS = {"state_dir", "bundle", "hq_token_file"}
LIST_FIELDS = {"trusted_keys", "providers"}


def config_from_dict(data: dict, where: str = "config") -> ApplianceConfig:
    known = {f.name for f in fields(ApplianceConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)} (allowed: {', '.join(sorted(known))})")
    values = {}
    for key, value in data.items():
        if key in LIST_FIELDS and not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, e.g. {key}: [{value}]")
        if key in PATH_FIELDS and value is not None:
            value = Path(value)
        elif key == "trusted_keys":
            value = tuple(Path(v) for v in value)
        elif key == "providers":
            value = tuple(value)
        elif key == "review":
            value = policy_from_dict(value, where, DEFAULT_REVIEW)
        elif key == "reject_signal":
            value = reject_signal_from_dict(value, where)
        values[key] = value
    try:
        return ApplianceConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def load_config(path: str | Path) -> ApplianceConfig:
    data = read_yaml(path, "appliance config", "start from systemd/appliance.example.yaml")
    return config_from_dict(data or {}, str(path))
