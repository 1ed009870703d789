"""Small helpers every floor shares: number checks for config validation, an atomic file
write, and UTC timestamps in the one ISO-8601 form the store, HQ and bundles write."""
from __future__ import annotations

import math
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

import yaml

from models.errors import ConfigError


def is_number(value) -> bool:
    """A finite int or float, not a bool (YAML's true/false) and not NaN or infinity."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_whole(value) -> bool:
    """An int, not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def read_yaml(path: str | Path, what: str, hint: str):
    """The parsed YAML file; ConfigError naming `what` when it is missing (with `hint`: where
    to start from) or is not valid YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist; {hint}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None


def section_values(data, section: str, allowed, example: str, where: str = "config") -> dict:
    """A config section (a YAML mapping such as `review:`) checked for shape and unknown keys;
    ConfigError naming the section otherwise. Returns a copy to build the section's dataclass."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {section} must be a mapping, e.g. {section}: {example}, not {data!r}")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown {section} key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return dict(data)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write, fsync and rename, so the file is either whole or absent (a manifest, a signature,
    a saved frame, an uploaded frame at HQ). Safe from several threads and processes at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def utc(moment: datetime | None = None) -> datetime:
    """The moment (now when None) as an aware UTC datetime; a naive one is taken as UTC."""
    if moment is None:
        return datetime.now(timezone.utc)
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def to_iso(moment: datetime | None = None, timespec: str = "milliseconds") -> str:
    """ISO-8601 in UTC ('2026-12-04T18:55:08.123+00:00'); timespec as datetime.isoformat's."""
    return utc(moment).isoformat(timespec=timespec)


def parse_iso(value) -> datetime | None:
    """An aware UTC datetime from an ISO-8601 string ('Z' or an offset), None for anything else."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return None if moment.tzinfo is None else moment.astimezone(timezone.utc)
