"""What is wrong with the appliance right now, in words an operator can act on.

Shown as a banner on the Live and Status screens (with how old the verdict on screen is) and
served at /v1/status: no camera, camera lost, the backup (fp32) model in use, the model past
its expiry date, disk low, and no contact with HQ. Each alarm says what happened and what to do; none stops inspection.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from models.bundle import expired as bundle_expired
from models.common import parse_iso

CAMERA_LOST_S = 5.0          # no frame for this long (or 5 frame intervals, if longer): camera lost
DISK_LOW_MB = 200.0          # free space under this: disk low (frames stop being saved at 0)
SYNC_STALLED_PASSES = 3      # no successful sync for this many intervals (plus a minute): stalled


@dataclass(frozen=True)
class Alarm:
    kind: str        # camera, model, disk, sync
    text: str


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h"


def camera_alarm(grabber, started_at: float, max_fps: float, now: float) -> Alarm | None:
    if grabber is None:
        return None
    quiet_for = now - (grabber.last_frame_at or started_at)
    if quiet_for < max(CAMERA_LOST_S, 5.0 / max_fps):
        return None
    why = f" ({grabber.error})" if grabber.error else ""
    if not grabber.captured:
        return Alarm("camera", f"No camera: no picture has come in {_ago(quiet_for)}{why}. Check that the "
                               "camera is plugged in and switched on.")
    return Alarm("camera", f"Camera lost: no picture for {_ago(quiet_for)}{why}. Parts are not being "
                           "inspected. Check the camera cable and power.")


def model_alarm(golden) -> Alarm | None:
    if golden is None or not golden.fallback:
        return None
    return Alarm("model", "Backup model in use: answers are checked but slower. Please tell the engineer "
                          "(details on the Status page).")


def expiry_alarm(manifest: dict) -> Alarm | None:
    if not bundle_expired(manifest):
        return None
    day = parse_iso(manifest["expires"]).astimezone().strftime("%d %b %Y")
    return Alarm("model", f"The model passed its expiry date ({day}). It keeps inspecting, but HQ must send a "
                          "newer one: tell the engineer.")


def disk_alarm(store_alarm: str | None, free_mb: float | None) -> Alarm | None:
    if store_alarm:
        return Alarm("disk", f"Disk problem: {store_alarm}. Inspection goes on; tell the engineer.")
    if free_mb is not None and free_mb < DISK_LOW_MB:
        return Alarm("disk", f"Disk almost full: {free_mb:.0f} MB free. Pictures stop being saved when it is "
                             "full; tell the engineer.")
    return None


def sync_alarm(hq_url: str | None, interval_s: float, last_ok_at: float | None, started_at: float,
               now: float) -> Alarm | None:
    if not hq_url or interval_s <= 0:
        return None
    silent = now - (last_ok_at or started_at)
    if silent < SYNC_STALLED_PASSES * interval_s + 60:
        return None
    return Alarm("sync", f"No contact with HQ for {_ago(silent)}: reviews are kept here and sent when it "
                         "comes back. Tell the engineer if this lasts.")


def current_alarms(appliance, now: float | None = None) -> list[Alarm]:
    """Every alarm that holds now (time.monotonic seconds), camera first."""
    now = time.monotonic() if now is None else now
    cfg = appliance.cfg
    found = [camera_alarm(appliance._grabber, appliance.started_at, cfg.max_fps, now),
             model_alarm(appliance.runtime.golden),
             expiry_alarm(appliance.runtime.manifest),
             disk_alarm(getattr(appliance.store, "alarm", None), appliance.disk_free_mb()),
             sync_alarm(cfg.hq_url, cfg.sync_interval_s, appliance.last_sync_ok_at, appliance.started_at, now)]
    return [a for a in found if a is not None]


def verdict_age(appliance, now: float | None = None) -> str | None:
    """How old the verdict on screen is, in words, or None when there is none yet."""
    if appliance.live.judgement is None:
        return None
    now = time.monotonic() if now is None else now
    return _ago(now - appliance.live.last_progress)
