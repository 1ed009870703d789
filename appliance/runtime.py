"""A verified bundle, ready to judge frames: preprocessing, cached catalog features, scoring
backend and the decide step, with the bundle's thresholds as runtime defaults."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.catalog import load_catalog, merge_candidates
from appliance.decide import Decision, Thresholds, decide, manifest_thresholds
from models.errors import ModelError
from models.preprocess import (VIEWS, PreprocessSpec, TextTokenizer, blank_input, frame_problem, frame_to_input,
                                 normalize, resize_gray, turn_upright, upright_quarter_turns, views_input)
from appliance.scoring import open_backend
from models.platform import cpu_flags, int8_kernel_path

log = logging.getLogger("linejudge.appliance")


FREE_TEXT_CACHE = 1024
BLANK_REWARDS_CACHE = 256     # candidate lists whose blank-frame rewards are kept

# Golden-set tolerance per precision: the largest |reward - recorded reward| over a frame's
# candidates may be this share of max(1, largest |reward|). The margin covers kernel changes
# between onnxruntime releases and CPUs, and stays far below a saturating INT8 kernel's error
# (the measured deltas per CPU: reports/measurements.md).
GOLDEN_TOLERANCE = {"int8": 0.05, "fp32": 0.01, "fp16": 0.05}


def scoring_threads(configured: int | None) -> int:
    """The configured thread count, else all cores but one: capture, storage, the UI and sync
    need a core too (`linejudge bench --pipeline` compares: reports/measurements.md)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return configured or max(1, usable - 1)       # affinity: a CPUAffinity= or cpuset limits it


@dataclass(frozen=True)
class Judgement:
    decision: Decision
    texts: list[str]
    rewards: np.ndarray
    latency_ms: float
    model_version: int


class ModelRuntime:
    def __init__(self, bundle_dir: Path, manifest: dict, backend: str = "onnxruntime",
                 providers: tuple[str, ...] = ("cpu",), allow_fallback: bool = False,
                 thresholds: dict | None = None, threads: int | None = None, int8: bool = True,
                 views: str = "one", cache_dir: Path | None = None, flag_budget: float | None = None):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.version = int(manifest["version"])
        self.spec = PreprocessSpec.from_dict(manifest["preprocessing"])
        self.thresholds = Thresholds.from_manifest(manifest_thresholds(manifest, views, flag_budget),
                                                   **(thresholds or {}))
        self.ood = manifest["ood"]
        self.backend = open_backend(self.bundle_dir, backend, providers, allow_fallback, int8=int8, threads=threads,
                                    cache_dir=cache_dir)
        self.tokenizer = TextTokenizer(self.bundle_dir / "tokenizer.json", self.spec.max_tokens)
        self.catalog = load_catalog(self.bundle_dir / "catalog.yaml")
        self.catalog_features = np.load(self.bundle_dir / "catalog_embeddings.npy")
        if len(self.catalog_features) != len(self.catalog.entries):
            raise ModelError(f"bundle {self.bundle_dir}: catalog_embeddings.npy does not match catalog.yaml")
        self._defective = dict(zip(self.catalog.displays, self.catalog.defective))
        self.blank_patches = self.backend.image_features(blank_input(self.spec))
        self._free_text: dict[str, np.ndarray] = {}   # free-text features, bounded cache
        self._blank_rewards: dict[tuple[str, ...], np.ndarray] = {}
        self.golden: GoldenReport | None = None       # set by open_checked_runtime
        self.views_name = views
        self.views = VIEWS[views]                     # the frame's views whose rewards are averaged

    def is_defective(self, verdict: str) -> bool | None:
        """Whether a catalog explanation names a defect; None for free text or no such fact."""
        return self._defective.get(verdict)

    @property
    def provider(self) -> str:
        return self.backend.provider

    @property
    def precision(self) -> str:
        """What the image encoder and scorer run in: "int8", "fp32" or (TensorRT) "fp16"."""
        return getattr(self.backend, "precision", None) or ("int8" if getattr(self.backend, "quantized", False)
                                                            else "fp32")

    def text_features(self, texts: list[str]) -> np.ndarray:
        """Catalog texts come from the cache; free text goes through the text encoder."""
        displays = self.catalog.displays
        missing = [t for t in texts if t not in displays and t not in self._free_text]
        if missing:
            if len(self._free_text) > FREE_TEXT_CACHE:
                self._free_text.clear()
            self._free_text.update(zip(missing, self.backend.text_features(*self.tokenizer.encode(missing))))
        return np.stack([self.catalog_features[displays.index(t)] if t in displays else self._free_text[t]
                         for t in texts])

    def judge(self, frame: np.ndarray, extra_candidates: list[str] | None = None,
              only_extra: bool = False) -> Judgement:
        started = time.perf_counter()
        texts = merge_candidates([] if only_extra else self.catalog.displays, extra_candidates)
        if not texts:
            raise ModelError("no candidate explanations to score")
        features = self.text_features(texts)
        gray = resize_gray(frame, self.spec.image_size)
        patches, rewards = self._view_averaged(gray, features)
        blank = self._blank_rewards_for(texts, features)
        defective = [self._defective.get(t) for t in texts]
        decision = decide(texts, rewards, blank, patches[0], self.thresholds, self.ood, defective,
                          frame_problem(gray))
        return Judgement(decision, texts, rewards, (time.perf_counter() - started) * 1000, self.version)

    def fact_support(self, ranking: list[tuple[str, float]]) -> list[tuple[str, object, float]]:
        """For each fact the verdict's catalog entry states (defective, type, level), how much of
        the probability over the catalog (softmax of the rewards) goes to entries stating the
        same value: (fact, the verdict's value, probability). Empty for a free-text verdict."""
        entries = {e.display: e for e in self.catalog.entries}
        scored = [(entries[t], s) for t, s in ranking if t in entries]
        if not scored or ranking[0][0] not in entries:
            return []
        rewards = np.array([s for _, s in scored])
        probs = np.exp(rewards - rewards.max())
        probs /= probs.sum()
        verdict = entries[ranking[0][0]].facts
        return [(fact, value, float(sum(p for (e, _), p in zip(scored, probs) if e.facts.get(fact) == value)))
                for fact, value in verdict.items()]

    def _view_averaged(self, gray: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The frame's patches (first view: the frame as it is, or turned upright) and its rewards
        averaged over self.views, all views in one image-encoder batch."""
        patches = self.backend.image_features(views_input(gray, self.spec, self.views_name))
        return patches[:1], self.backend.rewards(patches, features).mean(axis=0)

    def heat_map(self, frame: np.ndarray, ranking: list[tuple[str, float]]) -> np.ndarray | None:
        """Where on the frame the verdict comes from: a (g, g) grid over the patch grid, each cell
        how much the verdict's lead over the runner-up falls when that patch is replaced by a
        blank frame's (positive: the patch supports the verdict). One image pass and one scorer
        call of g*g + 1 rows; None where the patches are not a square grid or the backend refuses
        the batch (a TensorRT profile sized for one frame)."""
        texts = [t for t, _ in ranking[:2]]
        gray = resize_gray(frame, self.spec.image_size)
        turns = upright_quarter_turns(gray) if self.views[0] is turn_upright else 0   # the first view
        patches = self.backend.image_features(normalize(np.ascontiguousarray(np.rot90(gray, turns)), self.spec))
        cells = patches.shape[1]
        grid = int(round(cells ** 0.5))
        if grid * grid != cells:
            return None
        batch = np.repeat(patches, cells + 1, axis=0)
        batch[np.arange(1, cells + 1), np.arange(cells)] = self.blank_patches[0]
        try:
            rewards = self.backend.rewards(batch, self.text_features(texts))
        except Exception:                 # the screen goes on without a heat map
            return None
        lead = rewards[:, 0] - (rewards[:, 1] if rewards.shape[1] > 1 else 0.0)
        return np.rot90((lead[0] - lead[1:]).reshape(grid, grid), -turns)    # over the frame as shown

    def _blank_rewards_for(self, texts: list[str], features: np.ndarray) -> np.ndarray:
        """The rewards of these candidates on a blank frame (the image-reliance check): the same
        for every frame with this candidate list, so scored once, not once per frame."""
        key = tuple(texts)
        blank = self._blank_rewards.get(key)
        if blank is None:
            if len(self._blank_rewards) >= BLANK_REWARDS_CACHE:
                self._blank_rewards.clear()
            blank = self._blank_rewards[key] = self.backend.rewards(self.blank_patches, features)[0]
        return blank

    @classmethod
    def for_config(cls, bundle_dir: Path, manifest: dict, cfg, int8: bool = True) -> "ModelRuntime":
        """A runtime for a verified bundle with an ApplianceConfig's backend, providers and thresholds."""
        return cls(bundle_dir, manifest, cfg.backend, cfg.providers, cfg.allow_provider_fallback,
                   cfg.thresholds, scoring_threads(cfg.threads), int8=int8, views=cfg.views,
                   cache_dir=Path(cfg.state_dir) / "engine-cache" / f"v{manifest['version']}", flag_budget=cfg.flag_budget)

    def golden_check(self) -> "GoldenReport":
        """Re-judge the bundle's golden frames and compare with the rewards recorded at export
        for this precision (INT8 rows: "rewards"; fp32 and fp16: "rewards_fp32" where recorded)."""
        import cv2
        golden_dir = self.bundle_dir / "golden"
        expected = json.loads((golden_dir / "expected.json").read_text())
        reference = "" if self.precision == "int8" else "_fp32"
        tolerance = GOLDEN_TOLERANCE[self.precision]
        failures, deltas = [], []
        for row in expected:
            want_verdict = row.get(f"verdict{reference}", row["verdict"])
            want = np.asarray(row.get(f"rewards{reference}", row["rewards"]))
            frame = cv2.imread(str(golden_dir / row["frame"]), cv2.IMREAD_GRAYSCALE)
            rewards = self.backend.rewards(self.backend.image_features(frame_to_input(frame, self.spec)),
                                           self.catalog_features)[0]
            verdict = self.catalog.displays[int(rewards.argmax())]
            delta = float(np.abs(rewards - want).max())
            deltas.append((delta, row["frame"]))
            if verdict != want_verdict or delta > tolerance * max(1.0, float(np.abs(rewards).max())):
                failures.append({"frame": row["frame"], "expected": want_verdict, "got": verdict,
                                 "max_reward_delta": round(delta, 5)})
        worst_delta, worst_frame = max(deltas, default=(0.0, None))
        return GoldenReport(self.precision, len(expected), tuple(failures), round(worst_delta, 5),
                            worst_frame, tolerance)


@dataclass(frozen=True)
class GoldenReport:
    """The golden-set check of the graphs a runtime runs; `int8_failed` is the failed INT8
    check when this runtime is the fp32 fallback."""
    precision: str
    frames: int
    failures: tuple[dict, ...]
    worst_delta: float
    worst_frame: str | None
    tolerance: float
    int8_failed: "GoldenReport | None" = None

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def fallback(self) -> bool:
        return self.int8_failed is not None

    def as_dict(self) -> dict:
        """JSON-ready: /v1/status, the HQ status report, logs."""
        out = {"ok": self.ok, "precision": self.precision, "frames": self.frames,
               "failed_frames": [f["frame"] for f in self.failures], "worst_reward_delta": self.worst_delta,
               "worst_frame": self.worst_frame, "tolerance": self.tolerance, "fallback": self.fallback}
        if self.int8_failed:
            out["int8"] = self.int8_failed.as_dict()
        return out

    def summary(self) -> str:
        return (f"{self.precision.upper()} golden check: {len(self.failures)} of {self.frames} frames off, "
                f"worst reward delta {self.worst_delta:.2f} on {self.worst_frame}")


def open_checked_runtime(bundle_dir: Path, manifest: dict, cfg) -> ModelRuntime:
    """The runtime the appliance may judge with: the bundle's graphs (INT8 where it has them)
    when they pass the golden-set check. When the INT8 graphs fail it and the fp32 graphs pass,
    cfg.on_golden_failure decides: "fp32" runs the fp32 graphs (logged as a warning; the
    report says fallback), "refuse" raises. Raises ModelError whenever no graphs pass, with
    the cause and what to do. runtime.golden holds the report."""
    runtime = ModelRuntime.for_config(bundle_dir, manifest, cfg)
    report = runtime.golden_check()
    if report.ok:
        runtime.golden = report
        return runtime
    if runtime.precision != "int8" or cfg.backend != "onnxruntime":
        raise ModelError(f"bundle {bundle_dir}: golden-set check failed: {report.summary()} (tolerance "
                         f"{report.tolerance:g}); "
                         f"failed: {list(report.failures[:2])}. The bundle does not match its golden set "
                         "on this machine: install another bundle, or re-export this one")
    fp32 = ModelRuntime.for_config(bundle_dir, manifest, cfg, int8=False)
    fp32_report = fp32.golden_check()
    cause = _int8_cause(bundle_dir, report)
    if not fp32_report.ok:
        raise ModelError(f"{cause}; the fp32 graphs fail too ({fp32_report.summary()}): the bundle does not "
                         "run correctly on this machine; install another bundle")
    if cfg.on_golden_failure == "refuse":
        raise ModelError(f"{cause}; the fp32 graphs pass. Set on_golden_failure: fp32 in the appliance config "
                         f"to inspect with them (slower), or re-export the bundle with `linejudge bundle "
                         f"requantize {bundle_dir} --to DIR --key KEY`")
    log.warning("%s; inspecting with the fp32 graphs instead (on_golden_failure: fp32): slower, same "
                "answers as at export. Re-export the bundle with `linejudge bundle requantize`", cause)
    fp32.golden = GoldenReport(**{**vars(fp32_report), "int8_failed": report})
    return fp32


def _int8_cause(bundle_dir: Path, report: GoldenReport) -> str:
    return (f"bundle {bundle_dir}: golden-set check failed: INT8 results differ on this CPU, whose INT8 kernel path is "
            f"{int8_kernel_path(cpu_flags())}: worst reward delta "
            f"{report.worst_delta:.2f} on {report.worst_frame}, {len(report.failures)} of {report.frames} "
            f"golden frames off (tolerance {report.tolerance:g})")
