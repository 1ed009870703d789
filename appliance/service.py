"""The appliance: capture -> judge -> store, one inspection loop, watched by systemd.

Startup order: open the store, pick the active bundle, verify its signature, load it, run
the golden-set check, start the camera and the inspection loop, then tell systemd READY.
The loop keeps inspecting whatever the camera, the network or an operator does; an
inspection is committed to SQLite before the UI or API shows it.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from appliance import metrics, models_install
from appliance.capture import LatestFrameGrabber, open_source
from appliance.config import ApplianceConfig
from appliance.errors import CaptureError, ModelError
from appliance.runtime import Judgement, ModelRuntime
from appliance.store import Store

log = logging.getLogger("linejudge.appliance")


def sd_notify(message: str) -> bool:
    """systemd's notify protocol over $NOTIFY_SOCKET (no-op when not run by systemd)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


@dataclass
class LiveState:
    """What the Live screen shows: the latest committed inspection."""
    inspection_id: int | None = None
    frame: np.ndarray | None = None
    judgement: Judgement | None = None
    fps: float = 0.0
    last_progress: float = field(default_factory=time.monotonic)


class Appliance:
    def __init__(self, cfg: ApplianceConfig):
        self.cfg = cfg
        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
        self.store = Store(cfg.db_path, cfg.frames_dir if cfg.save_frames else None,
                           frame_budget_mb=cfg.frame_budget_mb, retention_days=cfg.retention_days)
        for name, pin in cfg.operator_pins.items():
            self.store.set_operator_pin(name, str(pin))
        self.runtime = self._load_model()
        self.live = LiveState()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._grabber: LatestFrameGrabber | None = None
        self._thread: threading.Thread | None = None
        self.extra_candidates: list[str] | None = None   # e.g. an upstream generator's best-of-N

    # ---------------------------------------------------------------- model
    def _load_model(self) -> ModelRuntime:
        bundle = models_install.active_bundle(self.cfg.bundles_dir, self.cfg.bundle)
        manifest = models_install.verify(bundle, self.cfg.key_files(), line=self.cfg.line)
        runtime = ModelRuntime(bundle, manifest, self.cfg.backend, self.cfg.providers,
                               self.cfg.allow_provider_fallback, self.cfg.thresholds, self.cfg.threads)
        check = runtime.golden_check()
        if not check["ok"]:
            raise ModelError(f"bundle {bundle} fails its golden-set check: {check['failures'][:2]}")
        self.store.record_model(runtime.version, "active", f"started from {bundle}")
        metrics.MODEL_VERSION.set(runtime.version)
        log.info("model v%s loaded from %s on %s", runtime.version, bundle, runtime.provider)
        return runtime

    def swap_model(self, runtime: ModelRuntime) -> None:
        """Hot swap: the next frame is judged by the new model; no frame is dropped."""
        with self._lock:
            self.runtime = runtime
        metrics.MODEL_VERSION.set(runtime.version)

    # ---------------------------------------------------------------- inspection
    def inspect(self, frame: np.ndarray, extra: list[str] | None = None, only_extra: bool = False,
                source: str = "camera") -> tuple[int, Judgement]:
        with self._lock:
            runtime = self.runtime
        judgement = runtime.judge(frame, extra, only_extra)
        d = judgement.decision
        png = cv2.imencode(".png", frame)[1].tobytes() if self.cfg.save_frames else None
        inspection_id = self.store.log_inspection(
            line=self.cfg.line, station=f"{self.cfg.station}:{source}", model_version=judgement.model_version,
            verdict=d.verdict, best_score=d.best_score, p_best=d.p_best, flagged=d.flagged,
            reasons=d.reasons, ranking=d.ranking, latency_ms=judgement.latency_ms, frame_png=png)
        metrics.observe(judgement)
        return inspection_id, judgement

    def _loop(self) -> None:
        frames, window_start, fps = 0, time.monotonic(), 0.0
        while not self._stop.is_set():
            try:
                _, frame = self._grabber.get(timeout=1.0)
            except CaptureError as exc:   # the camera reconnects by itself; keep waiting
                log.warning("%s", exc)
                continue
            finally:
                metrics.DROPPED.set(self._grabber.dropped)
            try:
                inspection_id, judgement = self.inspect(frame, self.extra_candidates)
            except Exception:  # a bad frame must not stop the line
                log.exception("inspection failed; continuing with the next frame")
                metrics.ERRORS.inc()
                continue
            frames += 1
            now = time.monotonic()
            if now - window_start >= 2.0:
                fps, frames, window_start = frames / (now - window_start), 0, now
            with self._lock:
                self.live = LiveState(inspection_id, frame, judgement, fps, now)
            sd_notify("WATCHDOG=1")

    def start(self) -> None:
        source = replay_source(self.cfg.source) or open_source(self.cfg.source)
        self._grabber = LatestFrameGrabber(source, max_fps=self.cfg.max_fps)
        self._thread = threading.Thread(target=self._loop, name="inspection-loop", daemon=True)
        self._thread.start()
        sd_notify(f"READY=1\nSTATUS=inspecting with model v{self.runtime.version} on {self.runtime.provider}")

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        if self._grabber:
            self._grabber.stop()
        self.store.close()

    def seconds_since_progress(self) -> float:
        return time.monotonic() - self.live.last_progress

    def frame_file(self, frame_path: str) -> Path:
        path = Path(frame_path)
        return path if path.is_absolute() else self.cfg.frames_dir / path

    def status(self) -> dict:
        stats = self.store.stats()
        usage = _disk_usage(Path(self.cfg.state_dir))
        return {"model_version": self.runtime.version, "provider": self.runtime.provider,
                "quantized": getattr(self.runtime.backend, "quantized", None),
                "fps": round(self.live.fps, 2),
                "latency_ms": round(self.live.judgement.latency_ms, 1) if self.live.judgement else None,
                "dropped_frames": self._grabber.dropped if self._grabber else 0,
                "disk_free_mb": usage, "alarm": getattr(self.store, "alarm", None),
                "thresholds": vars(self.runtime.thresholds), **stats}


def replay_source(spec):
    """`elpv:test` (or train/val): the ELPV cells of that split, replayed as a camera."""
    if not (isinstance(spec, str) and spec.startswith("elpv:")):
        return None
    import json
    import elpv_dataset
    from appliance.capture import FolderReplay
    root = Path(elpv_dataset.__file__).resolve().parent / "data" / "images"
    split_file = Path(__file__).resolve().parent.parent / "training" / "data" / "elpv_split.json"
    ids = json.loads(split_file.read_text())[spec.split(":", 1)[1]]
    return FolderReplay.from_files([root / f"{i}.png" for i in ids], name=spec)


def _disk_usage(path: Path) -> float:
    import shutil
    return round(shutil.disk_usage(path).free / 1e6, 1)
