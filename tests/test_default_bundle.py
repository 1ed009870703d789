"""The default bundle in models/ is what a fresh appliance starts with: it must verify against
the committed HQ key, pass its own golden-set check, and carry the full run's evaluation."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.config import DEFAULT_BUNDLE, DEFAULT_KEYS
from models import bundle as lib

ROOT = Path(__file__).resolve().parents[1]


def test_default_bundle_verifies_with_the_cli():
    done = subprocess.run([sys.executable, "-m", "appliance.cli", "bundle", "verify", str(DEFAULT_BUNDLE)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.startswith("OK: el-solar v")


@pytest.fixture(scope="module")
def manifest() -> dict:
    keys = lib.load_public_keys(sorted(DEFAULT_KEYS.glob("*.pub")))
    return lib.verify_bundle(DEFAULT_BUNDLE, keys, line="el-solar")


def test_default_bundle_is_int8_with_recorded_parity_and_metrics(manifest):
    assert manifest["version"] >= 1
    paths = {entry["path"] for entry in manifest["files"]}
    assert any("int8" in p for p in paths), paths
    assert manifest["lineage"]["training_config"] == "full"
    assert manifest["metrics"]["eval"]["split"] == "test"          # exported after `make eval-full`
    assert 0.0 <= manifest["metrics"]["eval"]["elpv_binary_accuracy"] <= 1.0


def test_default_bundle_passes_its_golden_check(manifest):
    from appliance.runtime import ModelRuntime
    runtime = ModelRuntime(DEFAULT_BUNDLE, manifest, threads=2)
    check = runtime.golden_check()
    assert check["ok"], check["failures"][:3]
