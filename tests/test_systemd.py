"""The shipped systemd units: valid for systemd itself, and hardened as the README promises."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = sorted(UNITS_DIR.glob("*.service")) + sorted(UNITS_DIR.glob("*.timer"))
# systemd-analyze verify only warns (exit 0) about these; they mean a directive systemd ignores.
IGNORED_DIRECTIVE = re.compile(r"Unknown (key|section|lvalue)|Invalid section header|"
                               r"Failed to parse|not valid|Missing '='", re.IGNORECASE)


def test_units_exist():
    names = {u.name for u in UNITS}
    assert {"appliance.service", "appliance-sync.service", "appliance-sync.timer", "hq.service"} <= names


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify(tmp_path):
    # ExecStart names /opt/linejudge/..., absent here: point it at a binary that exists, keep the rest.
    for unit in UNITS:
        text = re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", unit.read_text())
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", *sorted(p.name for p in tmp_path.iterdir())],
                            cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    bad = [line for line in output.splitlines() if IGNORED_DIRECTIVE.search(line)]
    assert not bad, "\n".join(bad)
    assert result.returncode == 0, output


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_verify_would_catch_a_misspelled_directive(tmp_path):
    """Guards the check above: systemd's output for an unknown key still matches our pattern."""
    (tmp_path / "x.service").write_text("[Unit]\nDescription=x\n[Service]\nExecStart=/bin/true\n"
                                        "ProtectSystm=strict\n")
    result = subprocess.run(["systemd-analyze", "verify", "x.service"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert IGNORED_DIRECTIVE.search(result.stdout + result.stderr)


MAX_EXPOSURE = 3.0
EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+\.\d+)")


def _exposure(unit: Path) -> float:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True, timeout=60)
    found = EXPOSURE.search(result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    return float(found.group(1))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", [u for u in UNITS if u.suffix == ".service"], ids=lambda u: u.name)
def test_every_service_is_rated_at_most_3_by_systemd_analyze_security(unit):
    assert _exposure(unit) <= MAX_EXPOSURE


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_security_check_would_catch_an_unhardened_service(tmp_path):
    plain = tmp_path / "plain.service"
    plain.write_text("[Unit]\nDescription=x\n[Service]\nExecStart=/bin/true\nNoNewPrivileges=yes\n")
    assert _exposure(plain) > MAX_EXPOSURE


def _directives(path: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_appliance_service_is_hardened_and_watched():
    d = _directives(UNITS_DIR / "appliance.service")
    assert d.get("Type") == ["notify"]
    assert d.get("WatchdogSec") and int(d["WatchdogSec"][0].rstrip("s")) > 0
    assert d.get("Restart") == ["on-failure"]
    assert d.get("NoNewPrivileges") == ["yes"]
    assert d.get("ProtectSystem") == ["strict"]
    assert d.get("ReadWritePaths") and all(v.startswith("/") for v in d["ReadWritePaths"])
    assert d.get("PrivateTmp") == ["yes"]


@pytest.mark.parametrize("unit", [u for u in UNITS if u.suffix == ".service"], ids=lambda u: u.name)
def test_exec_start_is_a_valid_linejudge_command(unit):
    """The units call `linejudge ...` with arguments our own parser accepts (no stale flags)."""
    import shlex
    from linejudge_cli import build_parser
    (exec_start,) = _directives(unit)["ExecStart"]
    argv = shlex.split(exec_start)
    assert argv[0].endswith("/linejudge"), exec_start
    build_parser().parse_args(argv[1:])  # argparse exits (SystemExit) on an unknown flag
