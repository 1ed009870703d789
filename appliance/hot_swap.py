"""A hot swap in the running appliance: a verified, staged bundle is opened and golden-checked,
swapped in while the inspection loop keeps going, and kept once it has judged
commit_after_inspections inspections without an error within commit_timeout_s; otherwise the
old model is swapped back. sync_once calls it as its swap(staged, manifest) -> (ok, reason)."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from appliance.runtime import ModelRuntime
from models.errors import ModelError, TrialInconclusive

log = logging.getLogger("linejudge.appliance")


class Stopping(BaseException):
    """stop() interrupted a sync pass (a backoff wait or a model trial). It unwinds sync_once
    without recording a verdict on the offered bundle, so the next start tries it again; a
    BaseException so that the pass's catch-all handlers do not log it as a failed install."""


class SwapTrial:
    """A hot-swapped runtime on probation. Counts the inspections (camera loop or API) it judged
    and committed, keeps the first error it raised, and sets `done` once it has enough healthy
    ones or an error. Bad input (BadFrame, BadExplanation) counts neither way."""

    def __init__(self, runtime: ModelRuntime, needed: int):
        self.runtime, self.needed = runtime, needed
        self.healthy, self.error = 0, None
        self.done = threading.Event()
        self._lock = threading.Lock()

    def record(self, runtime: ModelRuntime, error: BaseException | None = None) -> None:
        """One inspection judged by `runtime` (ignored unless it is the runtime on trial)."""
        if runtime is not self.runtime:
            return
        with self._lock:
            if self.done.is_set():
                return
            if error is not None:
                self.error = f"inspection failed with {type(error).__name__}: {error}"
            else:
                self.healthy += 1
            if error is not None or self.healthy >= self.needed:
                self.done.set()


class HotSwap:
    """One hot swap at a time. The appliance hands in how to open a runtime, which runtime is
    serving, how to swap one in, how many frames the camera has delivered, its stop event and
    the lock that guards its runtime; `trial` is the runtime on probation (None between swaps)."""

    def __init__(self, *, open_runtime: Callable[[Path, dict], ModelRuntime], current: Callable[[], ModelRuntime],
                 swap_in: Callable[[ModelRuntime], None], captured: Callable[[], int], stopping: threading.Event,
                 lock: threading.Lock, needed: int, timeout_s: float):
        self._open_runtime, self._current, self._swap_in = open_runtime, current, swap_in
        self._captured, self._stop, self._lock = captured, stopping, lock
        self.needed, self.timeout_s = needed, timeout_s
        self._swap_lock = threading.Lock()
        self.trial: SwapTrial | None = None

    def __call__(self, staged: Path, manifest: dict) -> tuple[bool, str]:
        """sync_once's swap in the running service: load the staged (verified) bundle, run its
        golden-set check, swap it in, and keep it once it has judged commit_after_inspections
        inspections without an error within commit_timeout_s; otherwise swap the old model back.
        Returns (ok, reason); sync_once then switches `current` or records the rejection."""
        with self._swap_lock:
            if self._stop.is_set():
                raise Stopping("the appliance is stopping")
            try:
                candidate = self._open_runtime(staged, manifest)
            except ModelError as exc:
                return False, str(exc)
            old, trial = self._current(), SwapTrial(candidate, self.needed)
            with self._lock:
                self.trial = trial
            self._swap_in(candidate)
            log.info("model v%s swapped in for v%s; on trial for %d inspections",
                     candidate.version, old.version, trial.needed)
            try:
                problem = self._await_trial(trial)
            except BaseException:
                self._swap_in(old)
                raise
            finally:
                with self._lock:
                    self.trial = None
        if problem:
            self._swap_in(old)
            log.warning("model v%s rolled back to v%s: %s", candidate.version, old.version, problem)
            return False, f"rolled back to v{old.version}: {problem}"
        log.info("model v%s committed after %d healthy inspections", candidate.version, trial.healthy)
        return True, ""

    def _await_trial(self, trial: SwapTrial) -> str | None:
        """Wait for the trial's verdict: None when healthy, else why the model is rejected (an
        error, or too slow: the camera delivered enough frames but the model judged too few in
        time). A trial that ran out of time because too few frames came (the line paused)
        proves nothing against the model: TrialInconclusive, offered again on the next pass."""
        deadline = time.monotonic() + self.timeout_s
        captured_before = self._captured()
        while not trial.done.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic()))):
            if self._stop.is_set():
                raise Stopping("the appliance stopped during a model trial")
            if time.monotonic() >= deadline:
                return self._trial_timed_out(trial, self._captured() - captured_before)
        return trial.error

    def _trial_timed_out(self, trial: SwapTrial, delivered: int) -> str:
        judged = (f"only {trial.healthy} of {trial.needed} inspections judged within "
                  f"commit_timeout_s={self.timeout_s:g} s")
        if delivered >= trial.needed:
            return f"too slow: {judged} while the camera delivered {delivered} frames"
        raise TrialInconclusive(f"{judged}: the camera delivered {delivered} frames (line idle?); the old "
                                "model is back and the new one is tried again on the next sync pass")
