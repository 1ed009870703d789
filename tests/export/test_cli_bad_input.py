"""Export, bundle, bench and hq commands: bad input ends with one clear line and exit 2, before
any slow work, and a failed export leaves no `.partial` directory behind."""
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from models.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "linejudge_cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd)


def one_line_error(result, *says):
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for text in says:
        assert text in result.stderr, result.stderr[-2000:]


@pytest.fixture
def untrained_run(tmp_path):
    """A run directory holding a small untrained student: enough to start an export."""
    from models.reward_model import STUDENT, RewardModel, save_model
    small = replace(STUDENT, pretrained_image=False, image_size=64, d_model=32, text_heads=2,
                    fusion_heads=2, summary_tokens=2, max_tokens=16, text_layers=1, text_embed_dim=8)
    save_model(RewardModel(small), tmp_path / "run" / "distill" / "model")
    return tmp_path / "run"


@pytest.mark.parametrize("flag, value", [("--calibration-frames", "0"), ("--val-limit", "0"),
                                         ("--version", "-1"), ("--version", "two")])
def test_export_numbers_must_be_positive_whole_numbers(tmp_path, flag, value):
    result = run_cli("export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "b"), flag, value)
    one_line_error(result, flag, "at least 1")


def test_export_options_refuse_numbers_below_one():
    from export.build_bundle import ExportOptions
    for field in ("version", "calibration_frames", "val_limit"):
        with pytest.raises(ConfigError, match=field):
            ExportOptions(**{field: 0})


def test_a_bad_key_fails_before_any_export_work_and_leaves_no_partial(untrained_run, tmp_path, monkeypatch):
    from export import build_bundle, to_onnx
    from models.bundle import BundleError

    def no_work(*_):
        raise AssertionError("ONNX export started before the signing key was loaded")
    monkeypatch.setattr(to_onnx, "torch_to_onnx", no_work)
    bad_key = tmp_path / "nope.key"
    bad_key.write_text("not a key")
    out = tmp_path / "bundle"
    with pytest.raises(BundleError, match="nope.key"):
        build_bundle.checkpoint_to_bundle(untrained_run, out, build_bundle.ExportOptions(key=bad_key))
    assert not out.exists() and not out.with_name("bundle.partial").exists()
    result = run_cli("export", "--checkpoint", str(untrained_run), "--out", str(out), "--key", str(bad_key))
    one_line_error(result, "nope.key")
    assert not out.with_name("bundle.partial").exists()


def test_a_failed_export_step_removes_the_partial_directory(untrained_run, tmp_path, monkeypatch):
    from export import build_bundle, to_onnx

    def fails(model, out):
        (out / "image_encoder.onnx").write_bytes(b"half written")
        raise build_bundle.ExportGateError("step 1 failed")
    monkeypatch.setattr(to_onnx, "torch_to_onnx", fails)
    existing = tmp_path / "el-solar-default"
    existing.mkdir()
    (existing / "manifest.json").write_text("{}")
    with pytest.raises(build_bundle.ExportGateError, match="step 1 failed"):
        build_bundle.checkpoint_to_bundle(untrained_run, existing, build_bundle.ExportOptions())
    assert [p.name for p in existing.iterdir()] == ["manifest.json"]
    assert not (tmp_path / "el-solar-default.partial").exists()


def test_bundle_sign_without_a_key_says_pass_key(tmp_path):
    one_line_error(run_cli("bundle", "sign", str(tmp_path)), "--key")


def test_hq_publish_without_a_bundle_says_pass_bundle(tmp_path):
    one_line_error(run_cli("hq", "publish", "--state-dir", str(tmp_path / "hq")), "--bundle")
    assert not (tmp_path / "hq").exists()          # refused before any HQ state is opened


def test_bench_without_a_trained_run_names_the_run(tmp_path):
    result = run_cli("bench", "--json", str(tmp_path / "bench.json"), "--run", str(tmp_path / "no-run"))
    one_line_error(result, "no-run", "multimodal/model", "--run")
    assert not (tmp_path / "bench.json").exists()


def test_bench_quotes_the_error_of_a_failed_variant(tmp_path):
    """A variant runs in its own process: its error reaches the user, not CalledProcessError."""
    run = tmp_path / "run"
    for stage in ("multimodal", "distill"):
        (run / stage / "model").mkdir(parents=True)
        (run / stage / "model" / "model.safetensors").write_bytes(b"garbage")
    result = run_cli("bench", "--json", str(tmp_path / "bench.json"), "--run", str(run))
    one_line_error(result, "bench torch-teacher failed", "ModelLoadError", str(run / "multimodal" / "model"))
    assert "CalledProcessError" not in result.stderr


def test_child_error_is_the_last_line_without_the_module_path():
    from export.bench import child_error
    traceback = "Traceback (most recent call last):\n  File x\nmodels.reward_model.ModelLoadError: bad model\n\n"
    assert child_error(traceback) == "ModelLoadError: bad model"
    assert "printed no error" in child_error("")
