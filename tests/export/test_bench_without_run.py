"""`linejudge bench` on a fresh clone: without --run the torch variants are built from the
bundle's training config (random weights, timing only), and both bench JSONs carry the
platform record. Tiny settings: one repeat, two frames, no minimum time per setting."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from export.bench import BenchError, check_inputs, run_bench
from models.platform import platform_record

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "linejudge_cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)


def bundle_with_lineage(tmp_path, tiny_bundle, **lineage) -> Path:
    """A copy of the tiny bundle's manifest (all check_inputs reads) with another lineage."""
    manifest = json.loads((tiny_bundle[0] / "manifest.json").read_text())
    manifest["lineage"] = {k: v for k, v in {**manifest["lineage"], **lineage}.items() if v is not None}
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_bench_without_a_run_times_models_built_from_the_bundles_training_config(tiny_bundle, tmp_path):
    out = tmp_path / "bench.json"
    summary = run_bench(None, tiny_bundle[0], out, frames=2, repeats=1, min_seconds=0.0)
    assert json.loads(out.read_text()) == summary and out.with_suffix(".png").is_file()
    for key in ("int8_vs_teacher_speedup_n16", "int8_vs_fp32_speedup_n16", "per_candidate_cost_ratio"):
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert summary["int8_vs_teacher_speedup_n16"] > 0 and summary["int8_vs_fp32_speedup_n16"] > 0
    # a station's views setting is timed too (what `views: upright2` in its config costs)
    assert set(summary["int8_p50_ms_n16_views"]) == {"upright", "upright2"}
    assert all(ms > 0 for v in summary["int8_p50_ms_n16_views"].values() for ms in v.values())
    assert summary["torch_models"] == ("built from training/configs/tiny.yaml model configs, "
                                       "random weights (timing only)")
    assert summary["torch_model_details"]["torch-teacher"]["image_size"] == 64      # tiny.yaml's
    assert summary["size_mb"]["torch-student"] > 0
    assert set(summary["platform"]) == set(platform_record())
    assert summary["platform"]["provider"] == "CPUExecutionProvider"
    assert {r["variant"] for r in summary["rows"]} == {"torch-teacher", "torch-student", "onnx-fp32", "onnx-int8"}


def test_a_run_is_still_used_when_given(tiny_run, tiny_bundle):
    source, about = check_inputs(tiny_run[0], tiny_bundle[0])
    assert source == str(tiny_run[0]) and about == f"from run {tiny_run[0]}"


def test_a_bundle_that_names_no_training_config_asks_for_run(tiny_bundle, tmp_path):
    bundle = bundle_with_lineage(tmp_path, tiny_bundle, training_config=None)
    result = run_cli("bench", "--json", str(tmp_path / "bench.json"), "--bundle", str(bundle))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "names no training config" in result.stderr and "pass --run" in result.stderr
    assert not (tmp_path / "bench.json").exists()


def test_a_training_config_that_is_not_in_the_repository_asks_for_run(tiny_bundle, tmp_path):
    bundle = bundle_with_lineage(tmp_path, tiny_bundle, training_config="no-such-recipe")
    with pytest.raises(BenchError, match=r"no-such-recipe.*training/configs/no-such-recipe\.yaml.*pass --run"):
        check_inputs(None, bundle)


def test_pipeline_bench_json_carries_the_platform_record(tmp_path):
    from appliance.bench_pipeline import run_pipeline_bench
    summary = run_pipeline_bench(json_path=tmp_path / "pipeline.json", seconds=0.5, repeats=1)
    assert summary["platform"] == platform_record(summary["provider"])
    assert json.loads((tmp_path / "pipeline.json").read_text())["platform"]["provider"] == summary["provider"]
