import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

TINY_CONFIG = ROOT / "training" / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A trained tiny run (every stage), shared by training, export and appliance tests."""
    from training.config import load_config
    from training.train import train
    out = tmp_path_factory.mktemp("tiny_run")
    summary = train(load_config(TINY_CONFIG), out)
    return out, summary


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory):
    """The tiny run exported to a signed bundle, with its trusted public key."""
    from export.build_bundle import ExportOptions, checkpoint_to_bundle
    from models import bundle as lib
    keys = tmp_path_factory.mktemp("keys")
    private, public = lib.generate_keypair(keys, "test-hq")
    out = tmp_path_factory.mktemp("bundle") / "el-solar-v1"
    opts = ExportOptions(key=private, key_id="test-hq", val_limit=24, calibration_frames=16,
                         gate_points=100.0, gate_top1=0.0)
    manifest = checkpoint_to_bundle(tiny_run[0], out, opts)
    return out, public, manifest
