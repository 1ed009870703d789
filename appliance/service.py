"""The appliance: capture -> judge -> store, one inspection loop, watched by systemd.

Startup order: open the store, pick the active bundle, verify its signature, load it, run
the golden-set check, start the camera and the inspection loop, then tell systemd READY.
The loop keeps inspecting whatever the camera, the network or an operator does; an
inspection is committed to SQLite before the UI or API shows it.

With hq_url set and sync_interval_s > 0 a daemon thread runs sync_once every interval with
hot_swap as its swap: a new bundle is golden-checked, swapped in while the loop keeps going,
and committed after commit_after_inspections healthy inspections, else swapped back. A
failed sync pass is logged and never stops inspection.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from appliance import metrics, models_install
from appliance.capture import LatestFrameGrabber, open_source
from appliance.config import ApplianceConfig
from models.errors import BadExplanation, BadFrame, CaptureError
from appliance.alarms import current_alarms
from appliance.decide import outcome
from appliance.reject_signal import ModbusRejectSignal
from appliance.hot_swap import HotSwap, Stopping, SwapTrial
from appliance.runtime import Judgement, ModelRuntime, open_checked_runtime
from appliance.store import PRUNE_BATCH, Store
from appliance.sync import sync_once
from models import bundle as lib
from models.platform import platform_record

log = logging.getLogger("linejudge.appliance")

FIRST_SYNC_DELAY_S = 5.0    # the first in-process sync pass comes this soon after start (or sooner)
PRUNE_INTERVAL_S = 60.0     # saved frames are pruned to frame_budget_mb / retention_days this often
STOP_JOIN_S = 5.0           # stop() waits this long for each thread


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


class FpsWindow:
    """Frames per second over windows of at least two seconds."""

    def __init__(self, window_s: float = 2.0):
        self.window_s, self.frames, self.start, self.fps = window_s, 0, time.monotonic(), 0.0

    def tick(self, now: float) -> float:
        self.frames += 1
        if now - self.start >= self.window_s:
            self.fps, self.frames, self.start = self.frames / (now - self.start), 0, now
        return self.fps


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
                           frame_budget_mb=cfg.frame_budget_mb, retention_days=cfg.retention_days,
                           review_policy=cfg.review)
        for name, pin in cfg.operator_pins.items():
            self.store.set_operator_pin(name, pin)
        self.store.keep_only_operators(cfg.operator_pins)
        self.runtime = self._load_model()
        self.live = LiveState()
        self._fps = FpsWindow()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._grabber: LatestFrameGrabber | None = None
        self._thread: threading.Thread | None = None
        self._sync_thread: threading.Thread | None = None
        self._prune_thread: threading.Thread | None = None
        self._hot_swap = HotSwap(
            open_runtime=lambda bundle, manifest: self._open_runtime(bundle, manifest),
            current=lambda: self.runtime, swap_in=lambda runtime: self.swap_model(runtime),
            captured=self._captured, stopping=self._stop, lock=self._lock,
            needed=cfg.commit_after_inspections, timeout_s=cfg.commit_timeout_s)
        self.last_sync: dict | None = None           # the last in-process sync pass's result
        self.last_sync_ok_at: float | None = None    # time.monotonic() of the last pass without errors
        self.started_at = time.monotonic()
        self.extra_candidates: list[str] | None = None   # e.g. an upstream generator's best-of-N
        self.reject_signal: ModbusRejectSignal | None = None   # started by start() when configured

    # ---------------------------------------------------------------- model
    def _load_model(self) -> ModelRuntime:
        bundle = models_install.active_bundle(self.cfg.bundles_dir, self.cfg.bundle)
        # The installed bundle keeps inspecting past its expiry (alarm and metric) until HQ sends
        # a newer one: an appliance cut off from HQ must not stop the line on that day.
        manifest = models_install.verify(bundle, self.cfg.key_files(), line=self.cfg.line, allow_expired=True)
        if lib.expired(manifest):
            log.warning("model bundle v%s expired at %s; inspecting on until HQ sends a newer one",
                        manifest["version"], manifest["expires"])
        runtime = self._open_runtime(bundle, manifest)
        note = f"started from {bundle}" + (" on its fp32 graphs (INT8 failed the golden check)"
                                           if runtime.golden.fallback else "")
        self.store.record_model(runtime.version, "active", note)
        metrics.model_loaded(runtime)
        log.info("model v%s loaded from %s on %s (%s)", runtime.version, bundle, runtime.provider, runtime.precision)
        return runtime

    def _open_runtime(self, bundle: Path, manifest: dict) -> ModelRuntime:
        """A golden-checked runtime for a verified bundle, with this appliance's config (its
        backend, providers, thresholds and on_golden_failure policy); ModelError if refused."""
        return open_checked_runtime(bundle, manifest, self.cfg)

    def swap_model(self, runtime: ModelRuntime) -> None:
        """Hot swap: the next frame is judged by the new model; no frame is dropped."""
        with self._lock:
            self.runtime = runtime
        metrics.model_loaded(runtime)

    def hot_swap(self, staged: Path, manifest: dict) -> tuple[bool, str]:
        """sync_once's swap in the running service (appliance/hot_swap.py): try the staged bundle
        on live inspections, keep it or swap the old model back; returns (ok, reason)."""
        return self._hot_swap(staged, manifest)

    def _captured(self) -> int:
        return self._grabber.captured if self._grabber else 0

    # ---------------------------------------------------------------- inspection
    def inspect(self, frame: np.ndarray, extra: list[str] | None = None, only_extra: bool = False,
                source: str = "camera") -> tuple[int, Judgement]:
        """Judge a frame and commit the inspection; returns (inspection id, judgement)."""
        judged = self._judge(frame, extra, only_extra)
        return self._record(frame, *judged, source=source), judged[0]

    def _judge(self, frame: np.ndarray, extra: list[str] | None = None,
               only_extra: bool = False) -> tuple[Judgement, ModelRuntime, SwapTrial | None]:
        """The CPU half of an inspection: the current model's judgement (nothing stored yet)."""
        with self._lock:
            runtime, trial = self.runtime, self._hot_swap.trial
        try:
            return runtime.judge(frame, extra, only_extra), runtime, trial
        except (BadFrame, BadExplanation):
            raise                       # the input's fault, not the model's
        except Exception as exc:
            if trial is not None:
                trial.record(runtime, exc)
            raise

    def _record(self, frame: np.ndarray, judgement: Judgement, runtime: ModelRuntime,
                trial: SwapTrial | None, source: str = "camera") -> int:
        """The I/O half: save the frame, commit the row; returns the committed id."""
        d = judgement.decision
        png = None
        if self.cfg.save_frames:     # a replayed PNG keeps its file's bytes: no second encode
            png = getattr(frame, "png", None) or cv2.imencode(".png", frame)[1].tobytes()
        inspection_id = self.store.log_inspection(
            line=self.cfg.line, station=f"{self.cfg.station}:{source}", model_version=judgement.model_version,
            verdict=d.verdict, best_score=d.best_score, p_best=d.p_best, flagged=d.flagged,
            reasons=d.reasons, ranking=d.ranking, latency_ms=judgement.latency_ms, frame_png=png, source=source)
        metrics.observe(judgement)
        if self.reject_signal is not None and source == "camera":
            self._signal_outcome(inspection_id, judgement, runtime)
        if trial is not None:
            trial.record(runtime)
        return inspection_id

    def _signal_outcome(self, inspection_id: int, judgement: Judgement, runtime: ModelRuntime) -> None:
        d = judgement.decision
        displays = runtime.catalog.displays
        self.reject_signal.publish(outcome(d.flagged, runtime.is_defective(d.verdict)), inspection_id,
                                   judgement.model_version, displays.index(d.verdict) if d.verdict in displays else None)

    def _loop(self) -> None:
        """Camera -> judge -> record, pipelined: frame k is saved and committed on the recorder
        thread while frame k+1 is judged. Frame k reaches the Live screen (and feeds the
        watchdog) only once its row is committed; at most one commit is in flight."""
        pending: tuple[Future, np.ndarray, Judgement] | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="recorder") as recorder:
            while not self._stop.is_set():
                frame = self._next_frame()
                judged = self._judge_safely(frame) if frame is not None else None
                if pending is not None:
                    self._committed(*pending)
                    pending = None
                if judged is not None:
                    pending = (recorder.submit(self._record, frame, *judged), frame, judged[0])
            if pending is not None:
                self._committed(*pending)

    def _next_frame(self) -> np.ndarray | None:
        try:
            return self._grabber.get(timeout=1.0)[1]
        except CaptureError as exc:   # the camera reconnects by itself; keep waiting
            log.warning("%s", exc)
            return None
        finally:
            metrics.DROPPED.set(self._grabber.dropped)

    def _judge_safely(self, frame: np.ndarray):
        try:
            return self._judge(frame, self.extra_candidates)
        except Exception:  # a bad frame must not stop the line
            log.exception("inspection failed; continuing with the next frame")
            metrics.ERRORS.inc()
            return None

    def _committed(self, future: Future, frame: np.ndarray, judgement: Judgement) -> None:
        """Wait for a frame's commit, then show it and feed the watchdog."""
        try:
            inspection_id = future.result()
        except Exception:  # the store raised (it keeps its own alarm): the line goes on
            log.exception("inspection could not be recorded; continuing with the next frame")
            metrics.ERRORS.inc()
            return
        now = time.monotonic()
        with self._lock:
            self.live = LiveState(inspection_id, frame, judgement, self._fps.tick(now), now)
        sd_notify("WATCHDOG=1")

    def start(self) -> None:
        self.started_at = time.monotonic()
        if self.cfg.reject_signal is not None:
            self.reject_signal = ModbusRejectSignal(self.cfg.reject_signal).start()
        source = replay_source(self.cfg.source) or open_source(self.cfg.source)
        self._grabber = LatestFrameGrabber(source, max_fps=self.cfg.max_fps)
        self._thread = threading.Thread(target=self._loop, name="inspection-loop", daemon=True)
        self._thread.start()
        if self.cfg.save_frames or self.cfg.review.send_unreviewed_to_hq:
            self._prune_thread = threading.Thread(target=self._prune_loop, name="frame-pruner", daemon=True)
            self._prune_thread.start()
        if self.cfg.hq_url and self.cfg.sync_interval_s > 0:
            self._sync_thread = threading.Thread(target=self._sync_loop, name="hq-sync", daemon=True)
            self._sync_thread.start()
        sd_notify(f"READY=1\nSTATUS=inspecting with model v{self.runtime.version} on {self.runtime.provider}")

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._sync_thread, self._prune_thread):
            if thread:
                thread.join(timeout=STOP_JOIN_S)
        if self._sync_thread and self._sync_thread.is_alive():
            log.warning("the sync pass did not end within %g s (a request in flight); stopping anyway",
                        STOP_JOIN_S)
        if self._grabber:
            self._grabber.stop()
        if self.reject_signal is not None:
            self.reject_signal.stop()
        self.store.close()

    def _prune_loop(self) -> None:
        """Keep saved frames within frame_budget_mb and retention_days: at start, then every
        PRUNE_INTERVAL_S. Frames still to be sent to HQ are never removed (Store.prune_frames).
        Where the plant opts in, parts that left the review queue unreviewed go to the outbox."""
        while True:
            try:
                self.store.send_unreviewed()
                while self.cfg.save_frames and self.store.prune_frames() == PRUNE_BATCH and not self._stop.is_set():
                    pass      # a backlog goes in batches: inspections commit in between
            except Exception:  # a failed prune is retried; it never stops inspection
                log.exception("pruning saved frames failed; retrying in %g s", PRUNE_INTERVAL_S)
            if self._stop.wait(PRUNE_INTERVAL_S):
                return

    # ---------------------------------------------------------------- sync with HQ
    def _sync_loop(self) -> None:
        """The sync thread: a pass soon after start, then every sync_interval_s, until stop()."""
        delay = min(FIRST_SYNC_DELAY_S, self.cfg.sync_interval_s)
        while not self._stop.wait(delay):
            try:
                self.last_sync = sync_once(self.cfg, self.store, swap=self.hot_swap,
                                           sleep=self._sleep_unless_stopping, report=self.runtime_report)
                _log_sync(self.last_sync)
                if self.last_sync.get("ok"):
                    self.last_sync_ok_at = time.monotonic()
            except Stopping as exc:
                log.info("sync pass ended: %s; an offered bundle is tried again on the next start", exc)
                return
            except Exception:  # a failed sync never stops inspection
                log.exception("sync pass failed; the next pass retries")
            delay = self.cfg.sync_interval_s

    def _sleep_unless_stopping(self, seconds: float) -> None:
        """sync_once's backoff wait; ends the pass at once when stop() is called."""
        if self._stop.wait(seconds):
            raise Stopping("the appliance is stopping")

    def seconds_since_progress(self) -> float:
        return time.monotonic() - self.live.last_progress

    def frame_file(self, frame_path: str) -> Path:
        path = Path(frame_path)
        return path if path.is_absolute() else self.cfg.frames_dir / path

    def runtime_report(self) -> dict:
        """What the model runs on here: the precision, its golden-set check and the platform
        record. In /v1/status, the Status screen and the status report to HQ."""
        runtime = self.runtime
        return {"precision": runtime.precision, "golden": runtime.golden.as_dict() if runtime.golden else None,
                "platform": platform_record(runtime.provider)}

    def status(self) -> dict:
        stats = self.store.stats()
        usage = self.disk_free_mb()
        runtime = self.runtime
        return {"model_version": runtime.version, "provider": runtime.provider,
                "quantized": getattr(runtime.backend, "quantized", None), **self.runtime_report(),
                "fps": round(self.live.fps, 2),
                "latency_ms": round(self.live.judgement.latency_ms, 1) if self.live.judgement else None,
                "dropped_frames": self._grabber.dropped if self._grabber else 0,
                "disk_free_mb": usage, "alarm": getattr(self.store, "alarm", None),
                "thresholds": vars(self.runtime.thresholds),
                "alarms": [{"kind": a.kind, "text": a.text} for a in current_alarms(self)], **stats}

    def disk_free_mb(self) -> float:
        return _disk_usage(Path(self.cfg.state_dir))


def _log_sync(result: dict) -> None:
    """One log line per sync pass: a warning when it had errors, else info."""
    model = result.get("model", {})
    summary = (f"sync: sent {result.get('sent')}, pending {result.get('pending')}, model "
               f"{model.get('action')}{' (' + model['reason'] + ')' if model.get('reason') else ''}")
    if result.get("ok"):
        log.info("%s", summary)
    else:
        log.warning("%s; errors: %s", summary, "; ".join(result.get("errors", []))[:500])


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
