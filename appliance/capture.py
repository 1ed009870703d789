"""Camera sources and a latest-frame grabber.

A source has a `name`, `read()` (a frame, or None when none is ready now), `close()`, and
`live`: False for recordings (folders, video files), which have no "now" to keep up with.
FolderReplay cycles over image files (the demo source). OpenCVSource wraps cv2.VideoCapture
for USB indexes, /dev/videoN (V4L2), rtsp:// and http(s):// streams, GStreamer pipelines and
video files, reconnecting with exponential backoff. LatestFrameGrabber reads in a background
thread and keeps only the newest frame of a live camera, so inference never works through a
stale backlog; a recording is read one frame ahead of the consumer instead, so every frame is
inspected and no CPU goes into decoding frames that would be dropped. When a source raises,
the grabber retries it with the same backoff until stopped.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np

from models.errors import BadFrame, CaptureError
from models.preprocess import decode_image_bytes

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
BACKOFF_START, BACKOFF_MAX = 0.5, 30.0
NETWORK_TIMEOUT_MS = 5000
IDLE_WAIT = 0.01            # the grabber's pause when a source has no frame ready


class FrameSource(Protocol):
    name: str
    live: bool          # optional; sources without it count as live

    def read(self) -> np.ndarray | None: ...

    def close(self) -> None: ...


class EncodedFrame(np.ndarray):
    """A frame that arrived already losslessly encoded (a replayed PNG file): `png` holds those
    bytes, so saving the frame needs no second encode. Read-only, since a replay shares it."""
    png: bytes | None = None


def _decode_file(path: Path) -> np.ndarray | None:
    """The decoded image, or None when the file cannot be read (deleted, no permission) or decoded."""
    try:
        data = path.read_bytes()
        frame = decode_image_bytes(data)
    except (OSError, BadFrame) as exc:
        log.debug("replay: cannot use %s: %s", path, exc)
        return None
    if path.suffix.lower() == ".png":
        frame = frame.view(EncodedFrame)
        frame.png = data
    frame.flags.writeable = False
    return frame


class FolderReplay:
    """Replays the images of a folder in sorted order, from the start again when loop=True.

    Like a camera, it hands over decoded frames: each file is decoded once and kept in memory
    while the replay fits in `cache_mb` (the ELPV test split: 654 cells, about 75 MB), so a
    looping demo spends its CPU on inspecting, not on decoding the same PNGs again."""
    live = False

    def __init__(self, folder: str | Path, loop: bool = True, cache_mb: float = 256):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CaptureError(f"replay folder {self.folder} does not exist; give a folder of png/jpg frames")
        files = sorted(p for p in self.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise CaptureError(f"no png/jpg images in {self.folder}; put some frames there")
        self._setup(files, f"folder:{self.folder}", loop, cache_mb)

    @classmethod
    def from_files(cls, files: list[Path], name: str, loop: bool = True, cache_mb: float = 256) -> "FolderReplay":
        """Replay an explicit list of image files (e.g. one split of a data set)."""
        files = [Path(f) for f in files if Path(f).is_file()]
        if not files:
            raise CaptureError(f"replay {name}: none of its image files exist")
        replay = cls.__new__(cls)
        replay.folder = files[0].parent
        replay._setup(files, name, loop, cache_mb)
        return replay

    def _setup(self, files: list[Path], name: str, loop: bool, cache_mb: float) -> None:
        self.files, self.name, self.loop = files, name, loop
        self.position, self.current = 0, None
        self._cache: dict[Path, np.ndarray] = {}
        self._cache_left = int(cache_mb * 1024 * 1024)

    def read(self) -> np.ndarray | None:
        """The next readable image (unreadable files are skipped); None once done if loop=False.
        CaptureError when a looping replay has no readable image left."""
        for _ in range(len(self.files)):
            if self.position >= len(self.files):
                if not self.loop:
                    return None
                self.position = 0
            path = self.files[self.position]
            self.position += 1
            frame = self._cache.get(path)
            if frame is None:
                frame = _decode_file(path)
                self._remember(path, frame)
            if frame is not None:
                self.current = path
                return frame
            log.warning("replay: skipping unreadable image %s", path)
        if self.loop and self.files:     # a whole pass found nothing: the grabber backs off
            raise CaptureError(f"replay {self.name}: none of its {len(self.files)} images can be read "
                               "any more; put readable frames back")
        return None

    def _remember(self, path: Path, frame: np.ndarray | None) -> None:
        size = 0 if frame is None else frame.nbytes + len(getattr(frame, "png", None) or b"")
        if frame is not None and size <= self._cache_left:
            self._cache[path] = frame
            self._cache_left -= size

    def close(self) -> None:
        self._cache.clear()


def capture_target(spec: str | int) -> tuple[str | int, int]:
    """(what to open, OpenCV backend) for a camera spec."""
    if isinstance(spec, int) or str(spec).isdigit():
        return int(spec), cv2.CAP_ANY
    spec = str(spec)
    if spec.startswith("/dev/video"):
        return spec, cv2.CAP_V4L2
    if "!" in spec:
        return spec, cv2.CAP_GSTREAMER
    return spec, cv2.CAP_ANY


def _is_network(spec: str | int) -> bool:
    return isinstance(spec, str) and spec.lower().startswith(("rtsp://", "http://", "https://"))


class OpenCVSource:
    """A cv2.VideoCapture that reconnects: after a failed read it waits 0.5 s, doubling to 30 s.

    read() tries once and returns None on failure (after the backoff wait), so a caller's
    loop keeps control; with max_failures set, that many failures in a row raise CaptureError.
    `sleep` and `opener` are injectable for tests; the default sleep ends early on close().
    """

    def __init__(self, spec: str | int, *, max_failures: int | None = None,
                 sleep: Callable[[float], object] | None = None, opener: Callable = cv2.VideoCapture):
        self.spec, self.name = spec, str(spec)
        self.live = not (isinstance(spec, str) and Path(spec).is_file())      # a video file is a recording
        self.target, self.api = capture_target(spec)
        self.max_failures, self.failures, self.backoff = max_failures, 0, BACKOFF_START
        self._closed = threading.Event()
        self._sleep = sleep or self._closed.wait
        self._opener, self._cap, self._lock = opener, None, threading.Lock()

    def _open(self):
        params = []
        if _is_network(self.spec):
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS,
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, NETWORK_TIMEOUT_MS]
        cap = self._opener(self.target, self.api, params)
        if cap.isOpened():
            log.info("camera %s opened", self.name)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)     # live cameras: do not queue stale frames
            return cap
        cap.release()
        return None

    def read(self) -> np.ndarray | None:
        with self._lock:
            if self._closed.is_set():
                return None
            if self._cap is None:
                self._cap = self._open()
            ok, frame = self._read_cap() if self._cap is not None else (False, None)
            if ok and frame is not None:
                if self.failures:
                    log.info("camera %s: frames again after %d failed attempts", self.name, self.failures)
                self.failures, self.backoff = 0, BACKOFF_START
                return frame
            if self._cap is not None:
                self._cap.release()
                self._cap = None
        self._after_failure()
        return None

    def _read_cap(self) -> tuple[bool, np.ndarray | None]:
        try:
            return self._cap.read()
        except Exception as exc:        # a driver error counts as a failed read: reconnect
            log.warning("camera %s: read failed: %s", self.name, exc)
            return False, None

    def _after_failure(self) -> None:
        self.failures += 1
        if self.max_failures is not None and self.failures >= self.max_failures:
            raise CaptureError(f"camera {self.name}: no frames after {self.failures} attempts; "
                               "check the cable, the URL or the path")
        log.warning("camera %s: no frame (attempt %d); reconnecting in %.1f s",
                    self.name, self.failures, self.backoff)
        self._sleep(self.backoff)
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def close(self) -> None:
        self._closed.set()          # wakes a backoff wait at once
        with self._lock:
            if self._cap is not None:
                self._cap.release()
                self._cap = None


def open_source(spec: str | int | Path) -> FrameSource:
    """"folder:/path" or a directory -> FolderReplay; anything else -> OpenCVSource."""
    if isinstance(spec, str) and spec.startswith("folder:"):
        return FolderReplay(spec[len("folder:"):])
    if isinstance(spec, (str, Path)) and not str(spec).isdigit() and Path(spec).is_dir():
        return FolderReplay(spec)
    return OpenCVSource(spec if isinstance(spec, int) else str(spec))


class LatestFrameGrabber:
    """Reads `source` in a background thread, at most `max_fps` frames a second, keeping only
    the newest frame. `captured` counts frames read, `dropped` those replaced before get().
    A source with live=False is paced by the consumer: the next frame is read while the
    current one is being judged, and none is dropped. When the source raises, the error is
    kept in `error` (get() reports it) and reading is retried after 0.5 s, doubling to 30 s,
    until a frame comes or stop()."""

    def __init__(self, source: FrameSource, max_fps: float | None = None, *, start: bool = True):
        self.source = source
        self.min_interval = 1.0 / max_fps if max_fps else 0.0
        self.paced = not getattr(source, "live", True)
        self.captured = self.dropped = 0
        self.error: BaseException | None = None
        self.last_frame_at: float | None = None      # time.monotonic() of the newest frame read
        self._frame, self._frame_id, self._taken_id = None, 0, 0
        self._cond, self._stop = threading.Condition(), threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"grab {source.name}", daemon=True)
        if start:
            self.start()

    def start(self) -> "LatestFrameGrabber":
        self._thread.start()
        return self

    def _run(self) -> None:
        backoff = BACKOFF_START
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                frame = self.source.read()
            except Exception as exc:        # CaptureError or a driver error: retry after a wait
                self._failed(exc, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if frame is not None:
                if self.error is not None:
                    log.info("capture from %s: frames again", self.source.name)
                    self.error, backoff = None, BACKOFF_START
                self._publish(frame)
                if self.paced:
                    self._wait_until_taken()
            pause = self.min_interval - (time.monotonic() - started)
            self._stop.wait(max(pause, 0.0 if frame is not None else IDLE_WAIT))

    def _failed(self, exc: Exception, backoff: float) -> None:
        log.error("capture from %s failed (%s: %s); retrying in %.1f s",
                  self.source.name, type(exc).__name__, exc, backoff)
        self.error = exc
        self._stop.wait(backoff)

    def _publish(self, frame: np.ndarray) -> None:
        with self._cond:
            if self._frame_id > self._taken_id:
                self.dropped += 1
            self._frame, self._frame_id = frame, self._frame_id + 1
            self.captured += 1
            self.last_frame_at = time.monotonic()
            self._cond.notify_all()

    def _wait_until_taken(self) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._taken_id >= self._frame_id or self._stop.is_set())

    def _has_news(self) -> bool:
        return self._frame_id > self._taken_id or self._stop.is_set()

    def get(self, timeout: float = 5.0) -> tuple[int, np.ndarray]:
        """The newest frame not yet taken, with its id (gaps in ids are dropped frames).
        Waits up to `timeout` for one, also while the source is failing and being retried."""
        with self._cond:
            self._cond.wait_for(self._has_news, timeout)
            if self._frame_id > self._taken_id:
                self._taken_id = self._frame_id
                self._cond.notify_all()         # a paced reader may go on
                return self._frame_id, self._frame
            if self._stop.is_set():
                raise CaptureError(f"the grabber for {self.source.name} was stopped")
            if (error := self.error) is not None:
                raise CaptureError(f"capture from {self.source.name} is failing ({error}); retrying, "
                                   "check the camera, the cable or the replay folder") from error
            raise CaptureError(f"no frame from {self.source.name} within {timeout:g} s; check the camera")

    def stop(self, close_source: bool = True) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if close_source:
            self.source.close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
