"""`linejudge bench --pipeline` runs end to end and reports what the issue asks for (no speed
targets here: those are for the benchmark, not for a unit test on a shared 2-core machine)."""
import json

from appliance.bench_pipeline import run_pipeline_bench


def test_pipeline_bench_reports_medians_of_real_runs(tmp_path):
    out = tmp_path / "pipeline.json"
    summary = run_pipeline_bench(json_path=out, seconds=1.0, repeats=2)
    assert json.loads(out.read_text()) == summary
    assert summary["candidates"] == 16 and summary["repeats"] == 2 and len(summary["runs"]) == 2
    assert all(r["inspections_committed"] > 0 for r in summary["runs"])
    assert summary["pipeline_fps_n16"] > 0 and summary["scorer_fps_n16"] > 0
    ratios = sorted(r["ratio"] for r in summary["runs"])
    assert summary["pipeline_vs_scorer_ratio"] == sum(ratios) / 2          # median of two
    assert summary["provider"] == "CPUExecutionProvider" and summary["scoring_threads"] >= 1
