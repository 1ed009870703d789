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
    done = subprocess.run([sys.executable, "-m", "linejudge_cli", "bundle", "verify", str(DEFAULT_BUNDLE)],
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
    assert check.ok and check.precision == "int8", check.failures[:3]


def test_possible_defect_flags_use_the_catalog_facts_and_a_config_threshold(manifest):
    """Defect-free verdicts are flagged as possible defects once the config sets p_defect;
    free-text candidates (facts unknown) never trigger it; an unknown threshold name is refused."""
    import cv2
    from appliance.config import config_from_dict
    from models.errors import ConfigError
    from appliance.runtime import ModelRuntime
    from training.data import elpv
    cfg = config_from_dict({"thresholds": {"p_defect": 0.0, "p_best": 0.0}})
    runtime = ModelRuntime(DEFAULT_BUNDLE, manifest, thresholds=cfg.thresholds, threads=2)
    functional = next(c for c in elpv.cells_for("val") if c.level == 0)
    d = runtime.judge(cv2.imread(str(functional.path), cv2.IMREAD_GRAYSCALE)).decision
    defect_free = {e.display for e in runtime.catalog.entries if not e.facts["defective"]}
    assert d.verdict in defect_free
    assert any(r.startswith("possible defect") for r in d.reasons)
    free_text = runtime.judge(cv2.imread(str(functional.path), cv2.IMREAD_GRAYSCALE),
                              ["a clean cell", "a cracked cell"], only_extra=True).decision
    assert not any(r.startswith("possible defect") for r in free_text.reasons)
    with pytest.raises(ConfigError, match=r"unknown thresholds \[.p_worst.\]; use p_best, .*p_defect"):
        config_from_dict({"thresholds": {"p_worst": 0.5}})
