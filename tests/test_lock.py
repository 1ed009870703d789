"""The running venv holds exactly the versions in requirements.lock (issue 17: reproducible installs).

`make install` installs every step with `-c requirements.lock`; this checks that it worked and
that nothing outside the lock crept in (a dependency added to pyproject.toml but not locked, a
package installed by hand, a venv left over from before the lock changed).
"""
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
PROJECT = "linejudge"
# Installed by venv/ensurepip, not by the lock, whenever the lock does not name them.
BOOTSTRAP = {"pip", "setuptools", "wheel"}
FIX = ("Regenerate the lock with `make lock` (if pyproject.toml changed on purpose), "
       "or reinstall the venv from the lock: `rm -rf .venv && make install`.")


def normalize(name):
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def same_version(a, b):
    try:
        from packaging.version import Version
        return Version(a) == Version(b)
    except Exception:
        return a == b


def read_lock(path=None):
    """{normalised name: version} from `name==version` lines; comments and blanks ignored."""
    pins, bad = {}, []
    for number, raw in enumerate((path or LOCK).read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=]+)", line)
        if not m or normalize(m.group(1)) in pins:
            bad.append(f"line {number}: {raw!r}")
            continue
        pins[normalize(m.group(1))] = m.group(2)
    return pins, bad


def installed():
    """{normalised name: [versions]} for every distribution the running interpreter sees."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), set()).add(dist.version)
    return {name: sorted(versions) for name, versions in found.items()}


def differences(pins, have):
    problems = []
    for name, version in sorted(pins.items()):
        versions = have.get(name)
        if not versions:
            problems.append(f"missing: {name}=={version} is locked but not installed")
        elif len(versions) > 1:
            problems.append(f"ambiguous: {name} is installed more than once ({', '.join(versions)}); "
                            f"locked {version}")
        elif not same_version(versions[0], version):
            problems.append(f"version: {name} {versions[0]} is installed, the lock says {version}")
    for name, versions in sorted(have.items()):
        if name in pins or name == PROJECT or name in BOOTSTRAP:
            continue
        problems.append(f"unlocked: {name}=={', '.join(versions)} is installed but not in "
                        f"{LOCK.name}")
    return problems


def test_lock_is_well_formed():
    pins, bad = read_lock()
    assert not bad, f"{LOCK.name}: not `name==version` (or a duplicate):\n  " + "\n  ".join(bad) \
        + f"\n{FIX}"
    assert PROJECT not in pins, f"{LOCK.name} must not pin the project itself ({PROJECT})"
    # torch is the local CPU build; any other torch pulls multi-GB CUDA wheels.
    assert pins.get("torch", "").startswith("2.13.0"), \
        f"{LOCK.name} must pin torch 2.13.0 (the CPU build on local disk), has {pins.get('torch')}"


def test_venv_matches_lock():
    pins, _ = read_lock()
    problems = differences(pins, installed())
    assert not problems, (
        f"{sys.prefix} does not hold exactly the versions in {LOCK.name} "
        f"({len(problems)} difference{'s' if len(problems) != 1 else ''}):\n  "
        + "\n  ".join(problems) + f"\n{FIX}")


def test_differences_are_reported():
    pins = {"numpy": "2.4.6", "gradio": "6.31.0", "onnxruntime": "1.32.0", "pip": "26.3"}
    have = {"numpy": ["2.4.6"], "gradio": ["6.32.0"], "opencv-python": ["5.1.0.95"],
            "pip": ["26.3"], "setuptools": ["84.2.1"], "linejudge": ["0.1.0"]}
    assert differences(pins, have) == [
        "version: gradio 6.32.0 is installed, the lock says 6.31.0",
        "missing: onnxruntime==1.32.0 is locked but not installed",
        "unlocked: opencv-python==5.1.0.95 is installed but not in requirements.lock",
    ]
    assert normalize("Typing_Extensions") == normalize("typing.extensions") == "typing-extensions"
