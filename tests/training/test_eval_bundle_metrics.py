"""`linejudge eval --model <bundle>` reports the checkpoint eval's image-reliance and phrasing
figures, computed from the bundle's own graphs by the shared metric code (training/metrics.py),
INT8 beside fp32, with the platform record; --precision evaluates one kind of graph alone."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from models.platform import platform_record

ROOT = Path(__file__).resolve().parents[2]
LIMIT = 12
SHARED = ("image_swap_accuracy", "heldout_phrasing_accuracy", "seen_phrasing_accuracy", "blank_frame_accuracy",
          "synthetic_pairwise_accuracy", "pairwise_accuracy", "elpv_binary_accuracy")


@pytest.fixture(scope="module")
def both(tiny_bundle):
    from export.evaluate_bundle import evaluate_bundle
    return evaluate_bundle(tiny_bundle[0], "val", limit=LIMIT)


def test_bundle_eval_has_the_checkpoint_evals_reliance_and_phrasing_keys(tiny_run, both):
    from training.evaluate import evaluate
    torch_metrics, _ = evaluate(tiny_run[0], "val", limit=LIMIT)
    per_fact = sorted(k for k in torch_metrics if k.startswith("synthetic_pairwise_accuracy_"))
    assert per_fact, "the checkpoint eval reports per-fact synthetic accuracy"
    assert per_fact == sorted(k for k in both if k.startswith("synthetic_pairwise_accuracy_"))
    for key in (*SHARED, *per_fact):
        assert 0 <= both[key] <= 1 and 0 <= both[f"fp32_{key}"] <= 1, key
        # the fp32 graphs are the torch model: the same figures, from the same metric code
        assert both[f"fp32_{key}"] == pytest.approx(torch_metrics[key], abs=1e-9), key
    for key in ("image_swap_accuracy", "heldout_phrasing_accuracy"):
        assert both[f"int8_drop_points_{key}"] == pytest.approx(100 * (both[f"fp32_{key}"] - both[key]))
    assert both["precision"] == "int8" and both["quantized_graphs"] and not both["fp32_quantized_graphs"]


def test_bundle_eval_compares_int8_with_fp32_and_records_the_platform(both):
    agree = both["int8_vs_fp32"]
    for key in ("top1_agreement", "synthetic_top1_agreement", "pairwise_int8", "pairwise_fp32"):
        assert 0 <= agree[key] <= 1, key
    assert agree["pairwise_int8"] == both["pairwise_accuracy"]
    assert agree["pairwise_fp32"] == both["fp32_pairwise_accuracy"]
    assert agree["max_abs_reward_delta"] >= agree["mean_abs_reward_delta"] >= 0
    assert set(both["platform"]) == set(platform_record())
    assert both["platform"]["provider"] == "CPUExecutionProvider"


@pytest.mark.parametrize("precision, prefix", [("int8", ""), ("fp32", "fp32_")])
def test_one_precision_alone_gives_that_precisions_figures_as_flat_keys(tiny_bundle, both, precision, prefix):
    from export.evaluate_bundle import evaluate_bundle
    alone = evaluate_bundle(tiny_bundle[0], "val", limit=LIMIT, precision=precision)
    assert alone["precision"] == precision
    assert not any(k.startswith(("fp32_", "int8_drop_points_")) for k in alone) and "int8_vs_fp32" not in alone
    for key in (*SHARED, "elpv_level_accuracy"):
        assert alone[key] == pytest.approx(both[f"{prefix}{key}"], abs=1e-9), key
    assert 0 <= alone["flag_rate"] <= 1 and alone["quantized_graphs"] == (precision == "int8")


def test_bundle_eval_cli_writes_the_json_for_one_precision(tiny_bundle, tmp_path):
    out = tmp_path / "eval.json"
    result = subprocess.run([sys.executable, "-m", "linejudge_cli", "eval", "--model", str(tiny_bundle[0]),
                             "--split", "val", "--limit", "4", "--precision", "fp32", "--json", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(out.read_text())
    assert metrics["precision"] == "fp32" and "image_swap_accuracy" in metrics and "platform" in metrics
    assert "image_swap_accuracy" in result.stdout
    assert (tmp_path / "eval_escapes.png").stat().st_size > 1000, "the escapes-against-flags plot is missing"


def test_escape_curve_trades_flags_for_escapes_and_marks_the_bundles_point(both):
    """A higher p_defect flags fewer parts and lets at least as many defective cells escape."""
    curve = both["escape_curve"]
    points = curve["points"]
    assert [p["p_defect"] for p in points] == sorted(p["p_defect"] for p in points) and len(points) == 49
    flags = [p["flag_rate"] for p in points]
    escapes = [p["defective_escape_rate"] for p in points]
    assert all(a >= b for a, b in zip(flags, flags[1:])), flags
    assert all(a <= b for a, b in zip(escapes, escapes[1:])), escapes
    assert curve["chosen"]["flag_rate"] == both["flag_rate"]
    assert curve["chosen"]["defective_escape_rate"] == both["defective_escape_rate"]


def test_each_flag_budget_does_on_the_calibration_frames_what_export_recorded(tiny_bundle):
    """Export chose p_best and p_defect per flag budget on the first 24 val cells; the eval of those
    same cells, through the appliance's own decide step, flags and lets escape exactly as recorded."""
    from export.evaluate_bundle import evaluate_bundle
    bundle, _, manifest = tiny_bundle
    for views in ("one", "upright2"):
        recorded = decide_thresholds(manifest, views)["budgets"]
        assert recorded, "export derives thresholds per flag budget"
        points = evaluate_bundle(bundle, "val", limit=24, precision="int8", views=views)["escape_curve"]["budgets"]
        assert [f"{p['flag_budget']:.2f}" for p in points] == sorted(recorded)
        for p in points:
            r = recorded[f"{p['flag_budget']:.2f}"]
            assert (p["flag_rate"], p["defective_escape_rate"]) == (r["val_flag_rate"], r["val_defective_escape_rate"])
            assert p["flag_rate"] <= p["flag_budget"]


def decide_thresholds(manifest, views):
    from appliance.decide import manifest_thresholds
    return manifest_thresholds(manifest, views)


def test_precision_is_refused_for_a_checkpoint(tiny_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "linejudge_cli", "eval", "--model", str(tiny_run[0]),
                             "--precision", "int8", "--json", str(tmp_path / "eval.json")],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "--precision is for bundles" in result.stderr
    assert not (tmp_path / "eval.json").exists()


def test_the_bundle_eval_needs_neither_torch_nor_the_checkpoint_eval():
    """The shared metrics live in training/metrics.py: the bundle eval imports no torch and not
    training.evaluate (the two modules no longer import each other)."""
    code = ("import sys, export.evaluate_bundle; "
            "print('torch' in sys.modules, 'training.evaluate' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.split() == ["False", "False"], result.stderr[-2000:]


def test_bundle_eval_reports_camera_variations_no_part_frames_and_outside_phrasings(both):
    from export.robustness import CAMERA_VARIATIONS, no_part_frames
    robust = both["robustness"]
    assert set(robust["camera_variations"]) == set(CAMERA_VARIATIONS)
    for name, m in robust["camera_variations"].items():
        assert 0 <= m["verdict_agreement"] <= 1 and 0 <= m["elpv_binary_accuracy"] <= 1, name
    no_part = robust["no_part_in_view"]
    assert set(no_part) == set(no_part_frames(64))
    assert all(m["flagged"] and m["reason"].startswith("no part in view") for m in no_part.values()), no_part
    for key, columns in (("outside_phrasings", 4), ("outside_phrasings_unseen", 6)):
        outside = robust[key]
        assert len(outside["per_column"]) == columns and 0 <= outside["elpv_binary_accuracy"] <= 1
        assert outside["catalog_elpv_binary_accuracy"] == pytest.approx(both["elpv_binary_accuracy"])


def test_quarter_turns_and_exposure_change_the_frame_not_its_shape():
    import numpy as np
    from export.robustness import CAMERA_VARIATIONS
    from models.preprocess import turn_upright
    frame = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8)
    for name, change in CAMERA_VARIATIONS.items():
        changed = change(frame)
        assert changed.shape == frame.shape and changed.dtype == np.uint8, name
        if name.endswith("_upright"):         # turned back: the frame as it was, or its half turn
            assert any(np.array_equal(changed, np.rot90(turn_upright(frame), k)) for k in (0, 2)), name
        else:
            assert not np.array_equal(changed, frame), f"{name} left the frame as it was"
