"""The benchmark's summary: the issue's flat keys, computed from the right rows."""
import os
from pathlib import Path

import pytest

from export.bench import VARIANTS, median_run, summarize

ALL = os.cpu_count() or 1


def _rows(variant, ms_per_frame, camera_extra):
    rows = []
    for threads in sorted({1, ALL}):
        for n in (1, 4, 16, 64):
            rows.append({"variant": variant, "threads": threads, "candidates": n, "p50_ms": ms_per_frame + 0.01 * n})
        if variant.startswith("onnx"):
            rows.append({"variant": variant, "threads": threads, "candidates": 16, "from_px": 300,
                         "p50_ms": ms_per_frame + 0.16 + camera_extra})
            rows.append({"variant": variant, "threads": threads, "candidates": 0, "image_encoder_only": True,
                         "p50_ms": ms_per_frame})
        if variant == "onnx-int8":
            rows += [{"variant": variant, "threads": threads, "candidates": 16, "views": v,
                      "p50_ms": k * ms_per_frame + 0.16 + threads} for k, v in ((1, "upright"), (2, "upright2"))]
    return {"rows": rows, "peak_rss_mb": 100.0}


def test_speedups_come_from_model_size_frames_and_camera_frames_separately(tmp_path):
    ms = {"torch-teacher": 200.0, "torch-student": 30.0, "onnx-fp32": 2.0, "onnx-int8": 1.0}
    results = {v: _rows(v, ms[v], camera_extra=0.1) for v in VARIANTS}
    summary = summarize(results, Path(tmp_path), Path(tmp_path))
    assert summary["int8_vs_fp32_speedup_n16"] == pytest.approx(2.16 / 1.16)
    assert summary["int8_vs_fp32_speedup_n16_from_300px"] == pytest.approx(2.26 / 1.26)
    assert summary["int8_vs_teacher_speedup_n16"] == pytest.approx(200.16 / 1.16)
    assert summary["per_candidate_cost_ratio"] == pytest.approx(0.01 / 1.0)
    assert summary["int8_p50_ms_n16"] == pytest.approx(1.16)          # the frame as it is, not a views row
    assert summary["int8_p50_ms_n16_views"]["upright2"] == {"single_thread": pytest.approx(3.16),
                                                           "all_threads": pytest.approx(2.16 + ALL)}


def test_the_median_run_is_reported_whole_with_every_run_beside_it():
    runs = [{"int8_vs_fp32_speedup_n16": x, "int8_p50_ms_n16": 3.0 / x, "rows": []} for x in (2.4, 1.9, 2.1)]
    chosen = median_run(runs)
    assert chosen["int8_vs_fp32_speedup_n16"] == 2.1 and chosen["int8_p50_ms_n16"] == pytest.approx(3.0 / 2.1)
    assert [r["int8_vs_fp32_speedup_n16"] for r in chosen["runs"]] == [2.4, 1.9, 2.1]
    assert median_run(runs[:2])["int8_vs_fp32_speedup_n16"] == 1.9    # even count: the lower middle
