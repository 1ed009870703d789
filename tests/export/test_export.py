"""torch -> ONNX -> INT8 -> signed bundle, checked at every step."""
import json
from dataclasses import replace

import numpy as np
import pytest

from models.errors import ConfigError
from appliance.scoring.onnx_backend import OnnxBackend
from export.build_bundle import ExportGateError, ExportOptions, checkpoint_to_bundle
from models import bundle as lib


def test_bundle_records_parity_and_verifies(tiny_bundle):
    out, public, manifest = tiny_bundle
    assert manifest["metrics"]["parity_fp32"]["max_abs_reward_delta"] <= 1e-4
    names = {f["path"] for f in manifest["files"]}
    for name in ("image_encoder.onnx", "image_encoder.int8.onnx", "text_encoder.onnx", "scorer.onnx",
                 "scorer.int8.onnx", "tokenizer.json", "catalog.yaml", "catalog_embeddings.npy",
                 "golden/expected.json"):
        assert name in names
    verified = lib.verify_bundle(out, lib.load_public_keys([public]), line="el-solar")
    assert verified["version"] == 1
    assert set(verified["thresholds"]) >= {"p_best", "ood_distance", "image_reliance"}
    assert len(verified["ood"]["mean"]) == 32          # the tiny model's d_model
    assert verified["lineage"]["training_config"] == "tiny"


def test_int8_graphs_are_quantized_and_agree_with_golden_verdicts(tiny_bundle):
    out, _, manifest = tiny_bundle
    int8 = OnnxBackend(out, int8=True)
    assert int8.quantized and int8.provider == "CPUExecutionProvider"
    import onnx
    ops = {n.op_type for n in onnx.load(str(out / "image_encoder.int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    golden = json.loads((out / "golden" / "expected.json").read_text())
    assert len(golden) == manifest["metrics"]["golden_frames"] > 0
    features = np.load(out / "catalog_embeddings.npy")
    assert features.shape[0] == 8          # one per catalog entry


def test_thresholds_are_not_baked_into_graphs(tiny_bundle):
    out, _, _ = tiny_bundle
    import onnx
    for name in ("scorer.onnx", "scorer.int8.onnx"):
        graph = onnx.load(str(out / name)).graph
        assert [i.name for i in graph.input if i.name in ("patches", "text_features")] == ["patches", "text_features"]
        assert [o.name for o in graph.output] == ["rewards"]   # raw rewards; deciding is a runtime step


def test_failing_int8_gate_names_the_divergent_tensors(tiny_run, tmp_path):
    opts = ExportOptions(val_limit=16, calibration_frames=8, gate_top1=1.01)
    with pytest.raises(ExportGateError, match=r"INT8 fails the gate.*\d+ val cells right only with fp32, \d+ only "
                                              r"with INT8, of 16\).*Most divergent tensors"):
        checkpoint_to_bundle(tiny_run[0], tmp_path / "b", opts)


def test_the_int8_gate_records_the_binary_drop_as_cells(tiny_bundle):
    """A drop of a point on val is two or three cells: the manifest says which way each flipped."""
    gate = tiny_bundle[2]["metrics"]["int8_gate"]
    cells = gate["binary_cells"]
    assert cells["val"] > 0 and cells["right_only_fp32"] >= 0 and cells["right_only_int8"] >= 0
    net = (cells["right_only_fp32"] - cells["right_only_int8"]) / cells["val"] * 100
    assert net == pytest.approx(gate["binary_drop_points"])
    assert cells["right_only_fp32"] + cells["right_only_int8"] == round((1 - gate["binary_agreement"]) * cells["val"])


def test_export_of_an_untrained_run_is_a_clear_error(tmp_path):
    with pytest.raises(ExportGateError, match="no distilled student"):
        checkpoint_to_bundle(tmp_path, tmp_path / "b", ExportOptions())


def test_bundle_eval_matches_the_torch_eval_in_fp32_and_reports_the_int8_drop(tiny_run, tiny_bundle):
    from training.evaluate import evaluate
    from export.evaluate_bundle import HEADLINE, evaluate_bundle
    torch_metrics, _ = evaluate(tiny_run[0], "val", limit=24)
    graphs = evaluate_bundle(tiny_bundle[0], "val", limit=24)
    for key in ("elpv_binary_accuracy", "elpv_level_accuracy", "pairwise_accuracy"):
        assert graphs[f"fp32_{key}"] == pytest.approx(torch_metrics[key], abs=1e-9), key
    for key in HEADLINE:
        assert graphs[f"int8_drop_points_{key}"] == pytest.approx(100 * (graphs[f"fp32_{key}"] - graphs[key]))
    assert graphs["model_version"] == tiny_bundle[2]["version"]
    assert 0 <= graphs["defective_escape_rate"] <= graphs["defective_missed_rate"] <= 1
    assert 0 <= graphs["flag_rate"] <= 1


def test_escapes_are_the_misses_that_no_flag_catches(tiny_bundle):
    """Flag everything: nothing escapes; flag nothing: every missed defective cell escapes."""
    from models.catalog import load_catalog
    from models.preprocess import PreprocessSpec, TextTokenizer
    from export.decide_stats import catalog_outputs
    from training.data.batches import elpv_set
    from export.evaluate_bundle import operator_metrics
    out, _, manifest = tiny_bundle
    spec = PreprocessSpec.from_dict(manifest["preprocessing"])
    data = elpv_set("val", spec.image_size, limit=24)
    catalog = load_catalog(out / "catalog.yaml")
    outputs = catalog_outputs(OnnxBackend(out), TextTokenizer(out / "tokenizer.json", spec.max_tokens),
                              spec, data.images, catalog)
    everything = operator_metrics(manifest, catalog, *outputs, data.levels, p_best=1.01)
    assert everything["flag_rate"] == 1 and everything["defective_escape_rate"] == 0
    assert everything["unflagged_binary_accuracy"] is None
    nothing = operator_metrics(manifest, catalog, *outputs, data.levels,
                               p_best=0.0, ood_distance=1e9, image_reliance=-1.0, p_defect=1.01)
    assert nothing["flag_rate"] == 0
    assert nothing["defective_escape_rate"] == nothing["defective_missed_rate"]
    defective = np.asarray(data.levels) >= 2
    called = np.array([bool(e.facts["defective"]) for e in catalog.entries])[outputs[1].argmax(1)]
    assert nothing["defective_missed_rate"] == pytest.approx((defective & ~called).sum() / defective.sum())
    assert nothing["unflagged_binary_accuracy"] == pytest.approx((called == defective).mean())


def test_a_failed_export_leaves_the_existing_bundle_alone(tiny_run, tmp_path):
    from export.build_bundle import ExportGateError, ExportOptions, checkpoint_to_bundle
    existing = tmp_path / "el-solar-default"
    existing.mkdir()
    (existing / "manifest.json").write_text("{}")
    impossible = ExportOptions(val_limit=24, calibration_frames=16, gate_points=100.0, gate_top1=1.01)
    with pytest.raises(ExportGateError, match="INT8 fails the gate"):
        checkpoint_to_bundle(tiny_run[0], existing, impossible)
    assert [p.name for p in existing.iterdir()] == ["manifest.json"]
    assert not (tmp_path / "el-solar-default.partial").exists()      # nothing half-built is left


def test_keep_fp32_takes_node_prefixes_and_leaves_those_nodes_in_float(tiny_bundle, tmp_path):
    import onnx
    from export import quantize
    fp32 = tiny_bundle[0] / "image_encoder.onnx"
    names = quantize.node_names(fp32)
    block0 = quantize.matching_nodes(names, ["/blocks.0/"])
    assert block0 and all(n.startswith("/blocks.0/") for n in block0)
    assert quantize.matching_nodes(names, [block0[0]]) == [block0[0]]       # an exact name
    assert quantize.matching_nodes(names, ["/blocks.0"]) == []             # a prefix must end in '/'
    rng = np.random.default_rng(0)
    size = onnx.load(str(fp32)).graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    feeds = [{"image": rng.normal(size=(1, 1, size, size)).astype(np.float32)} for _ in range(40)]
    out = quantize.onnx_to_int8(fp32, tmp_path / "int8.onnx", feeds, "percentile", keep_fp32=block0)
    graph = onnx.load(str(out)).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = {n.name: n for n in graph.node if n.op_type == "Conv"}
    kept = [convs[name] for name in block0 if name in convs]
    assert kept and all(n.input[1] not in dequantized for n in kept)      # float weights
    later = [n for name, n in convs.items() if name.startswith("/blocks.1/")]
    assert later and all(n.input[1] in dequantized for n in later)        # the rest is INT8


def test_the_manifest_lists_the_scorer_nodes_left_in_float_and_they_are(tiny_bundle):
    """A --keep-fp32 prefix matches in both graphs, so the manifest names what the scorer kept."""
    import onnx
    out, _, manifest = tiny_bundle
    kept = manifest["quantization"]["kept_fp32_nodes"]
    for stem in ("image_encoder", "scorer"):          # the stem; the nodes after the last LayerNorm
        graph = onnx.load(str(out / f"{stem}.int8.onnx")).graph
        dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        nodes = {n.name: n for n in graph.node}
        assert kept[stem] and all(nodes[name].input[1] not in dequantized for name in kept[stem]), stem  # float weights
        assert any(n.input[1] in dequantized for name, n in nodes.items()
                   if n.op_type in ("Conv", "MatMul") and name not in kept[stem]), stem


def test_calibration_runs_in_chunks_that_divide_the_frames():
    from export.quantize import calibration_stride
    assert [calibration_stride(n) for n in (320, 300, 40, 7, 37)] == [32, 30, 20, 7, 1]


def test_keep_fp32_that_names_no_node_is_a_clear_error(tiny_run, tmp_path):
    opts = ExportOptions(val_limit=16, calibration_frames=8, keep_fp32=("/no_such_block/",))
    with pytest.raises(ConfigError, match="--keep-fp32 /no_such_block/ names no node"):
        checkpoint_to_bundle(tiny_run[0], tmp_path / "b", opts)


def test_recalibrate_rederives_thresholds_and_signs_without_touching_the_graphs(tiny_bundle, tmp_path):
    import shutil
    import subprocess
    import sys
    out, old_public, manifest = tiny_bundle
    copy = tmp_path / "el-solar-v1"
    shutil.copytree(out, copy)
    private, public = lib.generate_keypair(tmp_path / "keys", "hq-2")
    cli = [sys.executable, "-m", "linejudge_cli", "bundle", "recalibrate", str(copy), "--trust", str(old_public)]

    def run(*extra):
        return subprocess.run(cli + list(extra), capture_output=True, text=True, timeout=300)
    for refused, says in ((run(), "pass --key"), (run("--key", str(tmp_path / "nope.key")), "nope.key")):
        assert refused.returncode != 0 and says in refused.stderr and "Traceback" not in refused.stderr
    assert lib.verify_bundle(copy, lib.load_public_keys([old_public]))      # a refused run leaves it intact
    done = run("--key", str(private), "--key-id", "hq-2")
    assert done.returncode == 0, done.stderr[-2000:]
    verified = lib.verify_bundle(copy, lib.load_public_keys([public]), line="el-solar")
    assert verified["files"] == manifest["files"]                      # graphs and files unchanged
    assert verified["lineage"]["recalibrated"]["by"] == "linejudge bundle recalibrate"
    assert {"p_defect", "val_flag_rate_all_reasons", "val_defective_escape_rate"} <= set(verified["thresholds"])
    assert "p_defect" in verified["thresholds"]
    tampered = json.loads((copy / "manifest.json").read_text())
    tampered["thresholds"]["p_best"] = 0.0
    (copy / "manifest.json").write_text(json.dumps(tampered))
    refused = run("--key", str(private), "--key-id", "hq-2")        # only a bundle that verifies is re-signed
    assert refused.returncode != 0 and "Traceback" not in refused.stderr


def test_joint_thresholds_catch_the_most_missed_defects_within_the_flag_budget():
    """Ten frames, four defective. Two missed defects (called functional) carry some chance of a
    defect; low confidence flags would only catch a right verdict."""
    from export.decide_stats import joint_thresholds
    called = np.array([0, 0, 0, 0, 0, 0, 1, 1, 0, 0], bool)
    truth = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1], bool)
    chance = np.array([.02, .03, .04, .05, .06, .07, .9, .9, .30, .20])
    confidence = np.array([.9, .9, .9, .9, .9, .55, .9, .9, .9, .9])
    t = joint_thresholds(confidence, chance, called, truth, np.zeros(10, bool), p_best_alone=0.6)
    assert t["val_defective_escape_rate"] == 0 and t["val_flag_rate_all_reasons"] == 0.2
    # the budget goes to possible defects; p_best rises as far as it can without adding a flag
    assert (t["p_defect"], t["p_best"], t["p_best_free_text"]) == (0.2, 0.55, 0.6)
    assert t["val_accuracy_unflagged_all_reasons"] == 1.0
    everything_flagged = joint_thresholds(confidence, chance, called, truth, np.ones(10, bool), 0.6)
    assert everything_flagged == {"p_defect": None}


def _joint_by_loop(confidence, chance, called, truth, other, p_best_alone, budget):
    """The selection rule written as the plain loop it replaced (plus the check-off option)."""
    from export.decide_stats import flag_outcomes
    best = None
    for p_best in np.unique(np.r_[0.5, np.round(confidence[confidence < p_best_alone], 3), p_best_alone]):
        for p_defect in np.r_[np.unique(np.round(chance[~called], 3)), np.inf]:
            flagged = other | (confidence < p_best) | (~called & (chance >= p_defect))
            o = flag_outcomes(called, truth, flagged)
            if o["flag_rate"] > budget:
                continue
            key = (-o["defective_escape_rate"], -o["flag_rate"], o["unflagged_binary_accuracy"] or 0.0, p_best)
            if best is None or key > best[0]:
                best = (key, p_best, None if np.isinf(p_defect) else p_defect)
    return None if best is None else best[1:]


def test_the_threshold_search_chooses_what_the_plain_loop_chooses():
    from export.decide_stats import joint_thresholds
    rng = np.random.default_rng(0)
    for case in range(150):
        n = int(rng.integers(5, 30))
        truth, called = rng.random(n) < 0.4, rng.random(n) < 0.35
        chance, confidence = rng.random(n).round(2), rng.uniform(0.5, 1.0, n).round(2)
        other = rng.random(n) < rng.choice([0.0, 0.1, 0.5])
        budget = float(rng.choice([0.1, 0.25, 0.4]))
        t = joint_thresholds(confidence, chance, called, truth, other, 0.8, max_flag_rate=budget)
        expected = _joint_by_loop(confidence, chance, called, truth, other, 0.8, budget)
        got = None if "p_best" not in t else (t["p_best"], t["p_defect"])
        assert got == expected, (case, got, expected)


def test_each_flag_budget_gets_the_thresholds_with_the_fewest_escapes_within_it():
    """Twenty frames, eight defective, five of those called functional with falling chances of a
    defect; the other reasons already flag one frame. A larger budget catches more missed defects."""
    from appliance.decide import FLAG_BUDGETS
    from export.decide_stats import budget_thresholds, joint_thresholds
    truth = np.r_[np.zeros(12, bool), np.ones(8, bool)]
    called = np.r_[np.zeros(12, bool), np.zeros(5, bool), np.ones(3, bool)]
    chance = np.r_[np.linspace(0.01, 0.12, 12), [0.6, 0.45, 0.3, 0.25, 0.05], [0.9] * 3]
    confidence = np.r_[np.full(11, 0.95), 0.58, np.full(8, 0.95)]
    other = np.zeros(20, bool)
    other[0] = True
    budgets = budget_thresholds(confidence, chance, called, truth, other, p_best_alone=0.7)
    assert list(budgets) == [f"{b:.2f}" for b in FLAG_BUDGETS]
    assert [b["val_defective_escape_rate"] for b in budgets.values()] == [4 / 8, 3 / 8, 2 / 8] + [1 / 8] * 4
    for key, b in budgets.items():
        assert b["val_flag_rate"] <= float(key)
    # 0.10: the other reason plus the likeliest missed defect; p_best rises as far as it can
    # without adding a flag (the 0.58 frame is defect-free and called so)
    assert budgets["0.10"] == {"p_best": 0.58, "p_defect": 0.6, "val_flag_rate": 0.1,
                               "val_defective_escape_rate": 4 / 8}
    # the 0.05 chance lies below every defect-free frame's 0.06-0.12: catching it costs 60 % of frames
    assert budgets["0.25"]["p_defect"] == 0.25 and budgets["0.25"]["val_flag_rate"] == 0.25
    assert joint_thresholds(confidence, chance, called, truth, other, 0.7)["p_defect"] == budgets["0.40"]["p_defect"]
    assert budget_thresholds(confidence, chance, called, truth, np.ones(20, bool), 0.7) == {}


def test_the_int8_gate_refuses_a_lost_verdict_even_when_the_pairs_still_agree():
    """The gate reads what the line sees: binary accuracy and the binary verdict, besides the pairs
    and a floor on the exact catalog entry."""
    from export.build_bundle import _gate_fails
    good = {"pairwise_drop_points": -0.3, "binary_drop_points": -0.8, "binary_agreement": 0.985,
            "top1_agreement": 0.974}
    opts = ExportOptions()
    assert not _gate_fails(good, opts)
    assert _gate_fails({**good, "binary_drop_points": 0.8}, opts)            # INT8 calls more cells wrong
    assert _gate_fails({**good, "binary_agreement": 0.97}, opts)             # 3 % of verdicts flip
    assert _gate_fails({**good, "top1_agreement": 0.957}, opts)              # every block INT8 (v2's 0.957)
    assert _gate_fails({**good, "pairwise_drop_points": 0.6}, opts)


def test_the_white_point_travels_into_the_bundle_and_the_appliance_applies_it(tiny_bundle):
    """tiny.yaml trains with a white point: the manifest carries it, the appliance's runtime reads
    it, its golden check passes (the golden frames were scored through the same normalisation),
    and a frame 0.7x as bright gets the rewards of the frame as it was."""
    from appliance.runtime import ModelRuntime
    from models.preprocess import PreprocessSpec
    from training.data.batches import elpv_set
    out, _, manifest = tiny_bundle
    assert PreprocessSpec.from_dict(manifest["preprocessing"]).white_point == 185.0
    runtime = ModelRuntime(out, manifest)
    assert runtime.spec.white_point == 185.0 and runtime.golden_check().ok
    frame = elpv_set("val", 64, limit=1).images[0]
    darker = (frame.astype(np.float32) * 0.7).astype(np.uint8)
    same, darkened = runtime.judge(frame).rewards, runtime.judge(darker).rewards
    spread = same.max() - same.min()
    assert np.abs(same - darkened).max() < 0.1 * spread
    # appliance software that predates the white point would skip it: the dim golden frames catch that
    skipped = {**manifest, "preprocessing": {**manifest["preprocessing"], "white_point": None}}
    golden = json.loads((out / "golden" / "expected.json").read_text())
    assert sum("exposure" in row["cell"] for row in golden) == len(golden) // 2
    assert not ModelRuntime(out, skipped).golden_check().ok


def test_export_derives_thresholds_for_every_views_setting_and_each_station_uses_its_own(tiny_bundle):
    """A station averaging two views is more confident than one judging the frame once: export
    calibrates a threshold set per `views` setting, the runtime and the eval take the station's."""
    from appliance.decide import Thresholds
    from appliance.runtime import ModelRuntime
    from export.decide_stats import catalog_outputs
    from export.evaluate_bundle import operator_metrics
    from models.catalog import load_catalog
    from models.preprocess import VIEWS, PreprocessSpec, TextTokenizer
    from training.data.batches import elpv_set
    out, _, manifest = tiny_bundle
    by_views = manifest["thresholds"]["by_views"]
    assert set(by_views) == set(VIEWS) - {"one"}
    for views, values in by_views.items():
        assert {"p_best", "ood_distance", "image_reliance"} <= set(values)
        assert ModelRuntime(out, manifest, views=views).thresholds == Thresholds.from_manifest(values)
    assert ModelRuntime(out, manifest).thresholds == Thresholds.from_manifest(manifest["thresholds"])
    budget = by_views["upright2"]["budgets"]["0.20"]
    station = ModelRuntime(out, manifest, views="upright2", flag_budget=0.2).thresholds
    assert (station.p_best, station.p_defect) == (budget["p_best"], budget["p_defect"])
    # the eval reads the set of the views it judges with: make only upright2's flag everything
    strict = {**manifest, "thresholds": {**manifest["thresholds"],
                                         "by_views": {**by_views, "upright2": {**by_views["upright2"], "p_best": 1.01}}}}
    spec = PreprocessSpec.from_dict(manifest["preprocessing"])
    data = elpv_set("val", spec.image_size, limit=12)
    catalog = load_catalog(out / "catalog.yaml")
    tokenizer = TextTokenizer(out / "tokenizer.json", spec.max_tokens)
    outputs = catalog_outputs(OnnxBackend(out), tokenizer, spec, data.images, catalog, "upright2")
    assert operator_metrics(strict, catalog, *outputs, data.levels, views="upright2")["flag_rate"] == 1
    assert operator_metrics(strict, catalog, *outputs, data.levels, views="one") == \
        operator_metrics(manifest, catalog, *outputs, data.levels, views="one")
