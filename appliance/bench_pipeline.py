"""`linejudge bench --pipeline`: the whole appliance path against the scorer alone.

Replay camera (ELPV test cells; each PNG decoded once, then replayed from memory as a camera
hands over decoded frames) -> latest-frame grabber -> preprocess -> INT8 scoring of 16
candidates -> decide -> SQLite commit (WAL, synchronous=FULL) with the frame saved (a replayed
PNG is saved with its file's bytes; a camera frame would be PNG-encoded, about 0.75 ms more CPU).
Scorer-only runs the same judge() on frames already in memory, for a quarter of the time before
the pipeline run and a quarter after it; the mean is the reference.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np

from appliance.config import DEFAULT_BUNDLE, config_from_dict
from models.platform import platform_record

EXTRA = ["hairline crack along the upper busbar", "dark corner region, lower right", "finger interruption near the center",
         "soldering defect at the left edge", "uniform cell, no visible issue", "scratch across the middle",
         "shunted area in the upper left", "broken cell fragment, lower left"]


def run_pipeline_bench(bundle: str | Path = DEFAULT_BUNDLE, json_path: str | Path = "pipeline.json",
                       seconds: float = 20.0, keys: list | None = None, repeats: int = 3) -> dict:
    """`repeats` runs, each with its own scorer-only reference; the headline figures are the
    medians (a shared 2-core VM drifts by 10-20 % between runs), every run is in `runs`; `platform`
    records the CPU, its INT8 kernel path and the onnxruntime that ran (models/platform.py)."""
    runs = [_one_run(bundle, seconds, keys) for _ in range(repeats)]
    summary = {"candidates": runs[0]["candidates"],
               "pipeline_fps_n16": float(np.median([r["pipeline_fps"] for r in runs])),
               "scorer_fps_n16": float(np.median([r["scorer_fps"] for r in runs])),
               "pipeline_vs_scorer_ratio": float(np.median([r["ratio"] for r in runs])),
               "seconds": seconds, "repeats": repeats, "runs": runs,
               "frames_dropped": sum(r["frames_dropped"] for r in runs), "provider": runs[0]["provider"],
               "scoring_threads": runs[0]["scoring_threads"], "frames_saved": runs[0]["frames_saved"],
               "frame_bytes": "replayed PNG file bytes (no re-encode)",
               "platform": platform_record(runs[0]["provider"])}
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _one_run(bundle, seconds: float, keys) -> dict:
    from appliance.runtime import scoring_threads
    from appliance.service import Appliance, replay_source
    with tempfile.TemporaryDirectory() as state:
        cfg = config_from_dict({"state_dir": state, "bundle": str(bundle), "max_fps": 1000,
                                "trusted_keys": [str(k) for k in keys or []]}, "bench")
        app = Appliance(cfg)
        runtime = app.runtime
        source = replay_source("elpv:test")
        frames = [source.read() for _ in range(64)]
        runtime.judge(frames[0], EXTRA)                      # warm the free-text cache
        n_candidates = len(runtime.judge(frames[0], EXTRA).texts)
        judge = lambda i: runtime.judge(frames[i % len(frames)], EXTRA)   # noqa: E731
        scorer_before = _rate(judge, seconds / 4)
        before = app.store.stats()["inspections"]
        app.extra_candidates = EXTRA
        app.start()
        time.sleep(seconds)
        done = app.store.stats()["inspections"] - before
        dropped = app._grabber.dropped
        app.stop()
        scorer_after = _rate(judge, seconds / 4)      # before and after: a drifting machine
    scorer_fps = (scorer_before + scorer_after) / 2   # (a shared VM) hits both sides alike
    return {"candidates": n_candidates, "pipeline_fps": done / seconds, "scorer_fps": scorer_fps,
            "scorer_fps_before_after": [scorer_before, scorer_after], "ratio": done / seconds / scorer_fps,
            "inspections_committed": done, "frames_dropped": dropped, "provider": runtime.provider,
            "scoring_threads": scoring_threads(cfg.threads), "frames_saved": cfg.save_frames}


def _rate(fn, seconds: float) -> float:
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn(n)
        n += 1
    return n / (time.perf_counter() - start)
