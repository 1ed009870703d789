"""A verified bundle, ready to judge frames: preprocessing, cached catalog features, scoring
backend and the decide step, with the bundle's thresholds as runtime defaults."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.candidates import load_catalog, merge_candidates
from appliance.decide import Decision, Thresholds, decide
from appliance.errors import ModelError
from appliance.preprocess import PreprocessSpec, TextTokenizer, blank_input, frame_to_input
from appliance.scoring import open_backend


FREE_TEXT_CACHE = 1024
BLANK_REWARDS_CACHE = 256     # candidate lists whose blank-frame rewards are kept


def scoring_threads(configured: int | None) -> int:
    """The configured thread count, else all cores but one: capture, storage, the UI and sync
    need a core too. On 2 cores (pipeline bench, 12 s runs): 549-571 frames/s with one scoring
    thread, 526-541 with two."""
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
                 thresholds: dict | None = None, threads: int | None = None):
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.version = int(manifest["version"])
        self.spec = PreprocessSpec.from_dict(manifest["preprocessing"])
        self.thresholds = Thresholds.from_manifest(manifest.get("thresholds", {}), **(thresholds or {}))
        self.ood = manifest["ood"]
        self.backend = open_backend(self.bundle_dir, backend, providers, allow_fallback, threads=threads)
        self.tokenizer = TextTokenizer(self.bundle_dir / "tokenizer.json", self.spec.max_tokens)
        self.catalog = load_catalog(self.bundle_dir / "catalog.yaml")
        self.catalog_features = np.load(self.bundle_dir / "catalog_embeddings.npy")
        if len(self.catalog_features) != len(self.catalog.entries):
            raise ModelError(f"bundle {self.bundle_dir}: catalog_embeddings.npy does not match catalog.yaml")
        self._defective = dict(zip(self.catalog.displays, self.catalog.defective))
        self.blank_patches = self.backend.image_features(blank_input(self.spec))
        self._free_text: dict[str, np.ndarray] = {}   # free-text features, bounded cache
        self._blank_rewards: dict[tuple[str, ...], np.ndarray] = {}

    @property
    def provider(self) -> str:
        return self.backend.provider

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
        patches = self.backend.image_features(frame_to_input(frame, self.spec))
        rewards = self.backend.rewards(patches, features)[0]
        blank = self._blank_rewards_for(texts, features)
        defective = [self._defective.get(t) for t in texts]
        decision = decide(texts, rewards, blank, patches[0], self.thresholds, self.ood, defective)
        return Judgement(decision, texts, rewards, (time.perf_counter() - started) * 1000, self.version)

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
    def for_config(cls, bundle_dir: Path, manifest: dict, cfg) -> "ModelRuntime":
        """A runtime for a verified bundle with an ApplianceConfig's backend, providers and thresholds."""
        return cls(bundle_dir, manifest, cfg.backend, cfg.providers, cfg.allow_provider_fallback,
                   cfg.thresholds, scoring_threads(cfg.threads))

    def golden_problem(self) -> str | None:
        """None when the golden-set check passes, else what failed (for logs, HQ and errors)."""
        check = self.golden_check()
        return None if check["ok"] else f"golden-set check failed: {check['failures'][:2]}"

    def golden_check(self, tolerance: float = 0.05) -> dict:
        """Re-judge the bundle's golden frames; verdicts must match the recorded ones."""
        import cv2
        golden_dir = self.bundle_dir / "golden"
        expected = json.loads((golden_dir / "expected.json").read_text())
        failures = []
        for row in expected:
            frame = cv2.imread(str(golden_dir / row["frame"]), cv2.IMREAD_GRAYSCALE)
            rewards = self.backend.rewards(self.backend.image_features(frame_to_input(frame, self.spec)),
                                           self.catalog_features)[0]
            verdict = self.catalog.displays[int(rewards.argmax())]
            delta = float(np.abs(rewards - np.asarray(row["rewards"])).max())
            if verdict != row["verdict"] or delta > tolerance * max(1.0, float(np.abs(rewards).max())):
                failures.append({"frame": row["frame"], "expected": row["verdict"], "got": verdict,
                                 "max_reward_delta": delta})
        return {"frames": len(expected), "failures": failures, "ok": not failures}
