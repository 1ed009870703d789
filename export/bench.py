"""`linejudge bench`: latency and throughput of every format, measured in one run.

Variants (each in its own process, so peak memory is its own):
  torch-teacher   fp32 torch, candidates encoded every frame (MiniLM), as trained
  torch-student   fp32 torch, candidates encoded every frame
  onnx-fp32       the bundle's fp32 graphs, catalog features cached (as the appliance runs)
  onnx-int8       the bundle's INT8 graphs, catalog features cached (as the appliance runs)
For N = 1, 4, 16, 64 candidates, single-thread and all threads: p50/p99 latency per frame,
frames/s; plus size on disk, peak RSS, the platform record (models/platform.py) and a PNG plot.

The torch variants come from a training run (`--run`), or, without one, are built from the
model configs of the training config the bundle's manifest names (`lineage.training_config`,
e.g. "full" -> training/configs/full.yaml) with random weights: their timings do not depend on
trained weights, so `linejudge bench` runs on a fresh clone. `torch_models` in the JSON says which.

Every variant gets the same input: a frame already at the model's size, normalised inside the
timed call. A camera frame must also be resized first (cv2 INTER_AREA, ~0.12 ms for ELPV's
300x300 -> 160 here, the same for every variant); the ONNX variants are also timed from a
300x300 frame at N = 16 (rows with "from_px": 300) so that cost is on record too, and as a station
with `views: upright` or `upright2` judges it (rows with "views": the frame turned upright, or that
and its half turn in one batch with the rewards averaged: `int8_p50_ms_n16_views`).
"""
from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from models.errors import ModelError

CANDIDATES = (1, 4, 16, 64)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "training" / "configs"
FROM_CONFIG = "config:"      # a torch source that is a training config, not a run directory
TORCH_SUBDIRS = {"torch-teacher": "multimodal/model", "torch-student": "distill/model"}
VARIANTS = ("torch-teacher", "torch-student", "onnx-fp32", "onnx-int8")
STATION_VIEWS = ("upright", "upright2")   # appliance `views` settings timed besides the frame as it is


def _texts(n: int) -> list[str]:
    base = ["crack in the upper left corner", "no defect, cell fully active", "severe burn at the center",
            "minor scratch along the lower edge", "dark inactive region on the right side",
            "probable microcrack near the busbar", "small pits in the middle", "stain in the lower right"]
    return [f"{base[i % len(base)]} ({i})" for i in range(n)]


def _timeit(fn, frames: int, warmup: int = 3, min_seconds: float = 1.0) -> np.ndarray:
    """At least `frames` calls and at least min_seconds of them: millisecond-scale graphs get
    hundreds of samples, so p50 is not at the mercy of a few noisy ones."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < frames or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return np.array(times)


def torch_model(variant: str, source: str):
    """The variant's torch model and what it came from: a run's saved model, or (source
    "config:<yaml>") one built from that training config's teacher/student config, random weights."""
    if source.startswith(FROM_CONFIG):
        from dataclasses import replace

        import torch
        from models.reward_model import RewardModel
        from training.config import load_config
        config = load_config(source[len(FROM_CONFIG):])
        cfg = config.teacher if variant == "torch-teacher" else config.student
        torch.manual_seed(0)
        model = RewardModel(replace(cfg, pretrained_image=False)).eval()   # no ImageNet read: timing only
        return model, {"training_config_hash": config.hash()}
    from models.reward_model import load_model
    return load_model(Path(source) / TORCH_SUBDIRS[variant]), {}


def _torch_runner(variant: str, source: str, threads: int):
    import torch
    from training.stages import Encoder
    torch.set_num_threads(threads)
    model, about = torch_model(variant, source)
    enc = Encoder(model.config.preprocess_spec())
    frame = np.random.default_rng(0).integers(0, 255, (1, model.config.image_size, model.config.image_size), np.uint8)

    def make(n):
        texts = _texts(n)

        @torch.no_grad()
        def run():
            if hasattr(model.text_encoder, "_cache"):
                model.text_encoder._cache.clear()   # no memo: encode every frame, honestly
            ids, mask = enc.texts(texts)
            return model.scorer(model.image_encoder(enc.frames(frame)), model.text_encoder(ids, mask))
        return run
    about = {**about, "parameters": model.parameter_count(), "image_size": model.config.image_size,
             "weights_mb": sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6}
    return make, about


CAMERA_PX = 300   # ELPV's native size: the resize a camera frame needs before the model


def _onnx_runner(bundle: Path, threads: int, int8: bool):
    from models.preprocess import PreprocessSpec, TextTokenizer, frame_to_input, resize_gray, views_input
    from appliance.scoring.onnx_backend import OnnxBackend
    manifest = json.loads((bundle / "manifest.json").read_text())
    spec = PreprocessSpec.from_dict(manifest["preprocessing"])
    backend = OnnxBackend(bundle, int8=int8, threads=threads)
    tokenizer = TextTokenizer(bundle / "tokenizer.json", spec.max_tokens)
    model_frame = np.random.default_rng(0).integers(0, 255, (spec.image_size, spec.image_size), np.uint8)

    def make(n, frame=model_frame, views="one"):
        features = backend.text_features(*tokenizer.encode(_texts(n)))   # cached, as the catalog is

        def run():
            return backend.rewards(backend.image_features(frame_to_input(frame, spec)), features)

        def run_views():      # the appliance's views setting: every view in one batch, rewards averaged
            patches = backend.image_features(views_input(resize_gray(frame, spec.image_size), spec, views))
            return backend.rewards(patches, features).mean(axis=0)
        return run if views == "one" else run_views
    image_only = lambda: backend.image_features(frame_to_input(model_frame, spec))  # noqa: E731
    return make, image_only, backend


def _timed_row(fn, frames: int, min_seconds: float = 1.0, **keys) -> dict:
    t = _timeit(fn, frames, min_seconds=min_seconds)
    return {**keys, "p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
            "fps": float(1000 / t.mean())}


def measure_variant(variant: str, torch_source: str, bundle: Path, frames: int, min_seconds: float = 1.0) -> dict:
    rows, about = [], {}
    for threads in (1, os.cpu_count() or 1):
        if variant.startswith("torch"):
            make, about = _torch_runner(variant, torch_source, threads)
        else:
            make, image_only, backend = _onnx_runner(bundle, threads, int8=variant == "onnx-int8")
            about = {"provider": backend.provider}
        row = dict(variant=variant, threads=threads)
        rows += [_timed_row(make(n), frames, min_seconds, **row, candidates=n) for n in CANDIDATES]
        if not variant.startswith("torch"):
            camera_frame = np.random.default_rng(1).integers(0, 255, (CAMERA_PX, CAMERA_PX), np.uint8)
            rows.append(_timed_row(make(16, camera_frame), frames, min_seconds, **row, candidates=16,
                                   from_px=CAMERA_PX))
            rows.append(_timed_row(image_only, frames, min_seconds, **row, candidates=0, image_encoder_only=True))
            if variant == "onnx-int8":        # what a station runs
                rows += [_timed_row(make(16, views=v), frames, min_seconds, **row, candidates=16, views=v)
                         for v in STATION_VIEWS]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"rows": rows, "peak_rss_mb": peak_mb, **about}


def _size_mb(paths) -> float:
    return sum(p.stat().st_size for p in paths if p.exists()) / 1e6


def summarize(results: dict, run_dir: Path | None, bundle: Path) -> dict:
    """The flat figures of one run of every variant. run_dir None: the torch models were built
    from a config, so their size is that of their weights in memory (fp32, as saved)."""
    def p50(variant, n, threads, from_px=None, views=None):
        return next(r["p50_ms"] for r in results[variant]["rows"] if r["candidates"] == n and r["threads"] == threads
                    and not r.get("image_encoder_only") and r.get("from_px") == from_px and r.get("views") == views)
    all_threads = os.cpu_count() or 1
    image_ms = next(r["p50_ms"] for r in results["onnx-int8"]["rows"]
                    if r.get("image_encoder_only") and r["threads"] == all_threads)
    per_candidate = (p50("onnx-int8", 64, all_threads) - p50("onnx-int8", 1, all_threads)) / 63
    summary = {
        "int8_vs_teacher_speedup_n16": p50("torch-teacher", 16, all_threads) / p50("onnx-int8", 16, all_threads),
        "int8_vs_fp32_speedup_n16": p50("onnx-fp32", 16, all_threads) / p50("onnx-int8", 16, all_threads),
        "int8_vs_fp32_speedup_n16_single_thread": p50("onnx-fp32", 16, 1) / p50("onnx-int8", 16, 1),
        "int8_vs_fp32_speedup_n16_from_300px": (p50("onnx-fp32", 16, all_threads, CAMERA_PX)
                                                / p50("onnx-int8", 16, all_threads, CAMERA_PX)),
        "per_candidate_cost_ratio": per_candidate / image_ms,
        "int8_p50_ms_n16": p50("onnx-int8", 16, all_threads),
        "int8_p50_ms_n16_single_thread": p50("onnx-int8", 16, 1),
        # a station that averages views (appliance config `views`) pays an image pass per view
        "int8_p50_ms_n16_views": {v: {"single_thread": p50("onnx-int8", 16, 1, views=v),
                                      "all_threads": p50("onnx-int8", 16, all_threads, views=v)} for v in STATION_VIEWS},
        "threads_all": all_threads,
        "size_mb": {**{v: (_size_mb([run_dir / sub / "model.safetensors"]) if run_dir is not None
                           else results[v].get("weights_mb")) for v, sub in TORCH_SUBDIRS.items() if v in results},
                    "onnx-fp32": _size_mb([bundle / f for f in ("image_encoder.onnx", "scorer.onnx")]),
                    "onnx-int8": _size_mb([bundle / f for f in ("image_encoder.int8.onnx", "scorer.int8.onnx")])},
        "peak_rss_mb": {v: results[v]["peak_rss_mb"] for v in results},
        "rows": [r for v in results for r in results[v]["rows"]],
    }
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, threads in zip(axes, (1, summary["threads_all"])):
        for variant in VARIANTS:
            rows = [r for r in summary["rows"] if r["variant"] == variant and r["threads"] == threads
                    and not r.get("image_encoder_only") and not r.get("from_px") and not r.get("views")]
            ax.plot([r["candidates"] for r in rows], [r["p50_ms"] for r in rows], "o-", label=variant)
        for r in summary["rows"]:
            if r["variant"] == "onnx-int8" and r["threads"] == threads and r.get("views") == "upright2":
                ax.plot([r["candidates"]], [r["p50_ms"]], "s", color="black", label="onnx-int8, views upright2")
        if threads == 1:
            ax.axhline(8.0, color="grey", linestyle=":", label="budget 8 ms (INT8, N = 16, one thread)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("candidates per frame")
        ax.set_title(f"{threads} thread(s)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("p50 latency per frame (ms)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class BenchError(ModelError):
    """A benchmark input is missing, or a variant's process failed (its own error is quoted)."""


def check_inputs(run_dir: Path | None, bundle: Path) -> tuple[str, str]:
    """Every variant's inputs, before any process starts. Returns the torch variants' source
    (a run directory, or "config:<yaml>") and what to say about it in the JSON."""
    bundle = Path(bundle)
    if not (bundle / "manifest.json").is_file():
        raise BenchError(f"{bundle} is not a bundle (no manifest.json): pass --bundle with a directory "
                         f"written by `linejudge export`")
    if run_dir is None:
        config = training_config_of(bundle)
        return FROM_CONFIG + str(config), (f"built from {_shown(config)} model configs, random weights "
                                           f"(timing only)")
    run_dir = Path(run_dir)
    for sub in TORCH_SUBDIRS.values():
        if not (run_dir / sub / "model.safetensors").is_file():
            raise BenchError(f"run {run_dir} has no {sub} (the torch variants need the teacher and the "
                             f"student): pass --run with a finished `linejudge train` run directory, e.g. "
                             f"`linejudge train --config training/configs/full.yaml --out {run_dir}` first, "
                             f"or leave --run out to time models built from the bundle's training config")
    return str(run_dir), f"from run {run_dir}"


def training_config_of(bundle: Path) -> Path:
    """The training config the bundle's manifest names (lineage.training_config), as a file."""
    try:
        manifest = json.loads((Path(bundle) / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{bundle}/manifest.json cannot be read ({exc}): pass --bundle with a directory "
                         f"written by `linejudge export`") from None
    lineage = manifest.get("lineage") if isinstance(manifest, dict) else None
    name = lineage.get("training_config") if isinstance(lineage, dict) else None
    if not isinstance(name, str) or not name:
        raise BenchError(f"bundle {bundle} names no training config (manifest lineage.training_config), "
                         f"so the torch variants cannot be built from it: pass --run with the training run "
                         f"it came from")
    path = CONFIG_DIR / f"{name}.yaml"
    if "/" in name or "\\" in name or not path.is_file():
        raise BenchError(f"bundle {bundle} was trained with config {name!r}, but there is no "
                         f"{_shown(path)}: pass --run with the training run it came from")
    return path


def _shown(path: Path) -> str:
    """A path relative to the repository where it lies inside it (training/configs/full.yaml)."""
    try:
        return str(Path(path).resolve().relative_to(CONFIG_DIR.parent.parent))
    except ValueError:
        return str(path)


def _measure(variant: str, torch_source: str, bundle: Path, frames: int, min_seconds: float = 1.0) -> dict:
    out = subprocess.run([sys.executable, "-m", "export.bench", variant, torch_source, str(bundle), str(frames),
                          repr(float(min_seconds))], capture_output=True, text=True)
    if out.returncode != 0:
        raise BenchError(f"bench {variant} failed (exit {out.returncode}): {child_error(out.stderr)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def child_error(stderr: str) -> str:
    """The child's own message: the last non-empty stderr line (a traceback's last line names
    the exception and its message), else a note that it printed nothing."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if not lines:
        return "it printed no error (killed? out of memory?)"
    return re.sub(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*: )", "", lines[-1])   # drop the module path


def median_run(summaries: list[dict], key: str = "int8_vs_fp32_speedup_n16") -> dict:
    """The run whose `key` is the median (the lower middle for an even count), reported whole
    so its figures stay consistent with each other; every run's flat figures go beside it."""
    ranked = sorted(summaries, key=lambda s: s[key])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["runs"] = [{k: v for k, v in s.items() if not isinstance(v, (list, dict))} for s in summaries]
    return chosen


def run_bench(run_dir: Path | None, bundle: Path, json_path: Path, frames: int = 30, repeats: int = 3,
              min_seconds: float = 1.0) -> dict:
    """The torch variants once (their gap to INT8 is two orders of magnitude); the ONNX variants,
    whose ratio is what this noisy-neighbour machine moves, `repeats` times, each in a fresh
    process, interleaved; the median run is reported. run_dir None: the torch variants are
    built from the bundle's training config (random weights; timings do not depend on them).
    Each setting is timed for at least `frames` calls and `min_seconds`."""
    from models.platform import platform_record
    torch_source, torch_about = check_inputs(run_dir, bundle)
    run_dir = Path(run_dir) if run_dir is not None else None
    torch_results = {}
    for variant in VARIANTS[:2]:
        print(f"bench {variant} ...", flush=True)
        torch_results[variant] = _measure(variant, torch_source, bundle, frames, min_seconds)
    summaries = []
    for r in range(repeats):
        results = dict(torch_results)
        for variant in VARIANTS[2:]:
            print(f"bench {variant} (run {r + 1}/{repeats}) ...", flush=True)
            results[variant] = _measure(variant, torch_source, bundle, frames, min_seconds)
        summaries.append(summarize(results, run_dir, Path(bundle)))
    summary = median_run(summaries)
    summary["torch_models"] = torch_about
    summary["torch_model_details"] = {v: {k: torch_results[v][k] for k in
                                          ("parameters", "image_size", "training_config_hash") if k in torch_results[v]}
                                      for v in VARIANTS[:2]}
    summary["platform"] = platform_record(results["onnx-int8"].get("provider"))   # the ONNX variants' provider
    summary["frames"], summary["repeats"], summary["min_seconds"] = frames, repeats, min_seconds
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    plot(summary, json_path.with_suffix(".png"))
    return summary


if __name__ == "__main__":  # one variant, in its own process
    variant, torch_source, bundle, frames = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
    min_seconds = float(sys.argv[5]) if len(sys.argv) > 5 else 1.0
    print(json.dumps(measure_variant(variant, torch_source, bundle, frames, min_seconds)))
