import threading
import time

import cv2
import numpy as np
import pytest

from appliance.capture import (FolderReplay, LatestFrameGrabber, OpenCVSource, capture_target,
                               open_source)
from models.errors import CaptureError


class CountingSource:
    """Returns frames 1, 2, 3, ... as fast as asked (optionally pausing per frame)."""

    def __init__(self, pause=0.0):
        self.name, self.n, self.pause, self.closed = "counting", 0, pause, False

    def read(self):
        if self.pause:
            time.sleep(self.pause)
        self.n += 1
        return np.full((4, 4), self.n % 256, np.uint8)

    def close(self):
        self.closed = True


@pytest.fixture
def frames_folder(tmp_path):
    for value, name in [(10, "b.png"), (200, "c.png"), (90, "a.png")]:
        cv2.imwrite(str(tmp_path / name), np.full((8, 8), value, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    return tmp_path


def test_folder_replay_cycles_over_sorted_images(frames_folder):
    replay = FolderReplay(frames_folder)
    values = [int(replay.read()[0, 0]) for _ in range(7)]
    assert values == [90, 10, 200, 90, 10, 200, 90]          # a, b, c; broken.png skipped
    assert replay.current.name == "a.png"
    once = FolderReplay(frames_folder, loop=False)
    assert [int(once.read()[0, 0]) for _ in range(3)] == [90, 10, 200]
    assert once.read() is None


def test_folder_replay_errors(tmp_path):
    with pytest.raises(CaptureError, match="no png/jpg"):
        FolderReplay(tmp_path)
    with pytest.raises(CaptureError, match="does not exist"):
        FolderReplay(tmp_path / "missing")


def test_open_source_picks_the_kind(frames_folder):
    assert isinstance(open_source(f"folder:{frames_folder}"), FolderReplay)
    assert isinstance(open_source(str(frames_folder)), FolderReplay)
    assert isinstance(open_source(0), OpenCVSource)
    assert isinstance(open_source("rtsp://10.0.0.5/stream"), OpenCVSource)
    assert capture_target(0) == (0, cv2.CAP_ANY) and capture_target("2") == (2, cv2.CAP_ANY)
    assert capture_target("/dev/video1") == ("/dev/video1", cv2.CAP_V4L2)
    pipeline = "v4l2src ! videoconvert ! appsink"
    assert capture_target(pipeline) == (pipeline, cv2.CAP_GSTREAMER)
    assert capture_target("https://cam/x.mjpg") == ("https://cam/x.mjpg", cv2.CAP_ANY)


def test_grabber_keeps_only_the_latest_frame_and_counts_drops():
    source = CountingSource()
    grabber = LatestFrameGrabber(source)
    taken = []
    for _ in range(5):
        time.sleep(0.02)
        taken.append(grabber.get(timeout=2)[0])
    grabber.stop()
    assert source.closed and taken == sorted(set(taken))
    assert grabber.dropped > 0
    assert grabber.captured - grabber.dropped - len(taken) in (0, 1)     # at most one still waiting


def test_grabber_respects_max_fps():
    grabber = LatestFrameGrabber(CountingSource(), max_fps=20)
    time.sleep(0.5)
    grabber.stop()
    assert 2 <= grabber.captured <= 20          # ~10 expected; generous bounds


def test_grabber_reports_timeouts_and_source_errors():
    class Silent(CountingSource):
        def read(self):
            return None

    class Broken(CountingSource):
        def read(self):
            raise CaptureError("camera unplugged")
    silent = LatestFrameGrabber(Silent())
    with pytest.raises(CaptureError, match="no frame from counting within 0.1 s"):
        silent.get(timeout=0.1)
    silent.stop()
    broken = LatestFrameGrabber(Broken())
    started = time.monotonic()
    with pytest.raises(CaptureError, match="camera unplugged"):
        broken.get(timeout=0.4)
    assert time.monotonic() - started >= 0.2      # waits for a frame; no busy loop for the caller
    assert broken._thread.is_alive()              # still retrying
    broken.stop()
    assert not broken._thread.is_alive()


class FlakySource(CountingSource):
    """Raises on its first read (a driver hiccup), then delivers frames."""

    def read(self):
        if self.n == 0:
            self.n = 1
            raise RuntimeError("driver hiccup")
        return super().read()


def test_grabber_survives_a_source_error_and_frames_keep_coming():
    grabber = LatestFrameGrabber(FlakySource(), max_fps=50)
    ids = [grabber.get(timeout=3)[0] for _ in range(3)]      # the retry comes after 0.5 s
    grabber.stop()
    assert ids == sorted(set(ids)) and grabber.error is None


def test_replay_skips_a_file_deleted_after_listing(frames_folder):
    grabber = LatestFrameGrabber(FolderReplay(frames_folder, cache_mb=0))
    assert int(grabber.get(timeout=2)[1][0, 0]) == 90            # a.png
    (frames_folder / "b.png").unlink()
    values = [int(grabber.get(timeout=2)[1][0, 0]) for _ in range(4)]
    grabber.stop()
    assert 10 not in values and values.count(200) >= 1 and values.count(90) >= 1
    assert grabber.error is None


def test_a_replay_whose_images_all_vanish_raises_so_the_grabber_backs_off(frames_folder):
    replay = FolderReplay(frames_folder, cache_mb=0)
    assert replay.read() is not None
    for image in frames_folder.iterdir():
        image.unlink()
    with pytest.raises(CaptureError, match=r"none of its \d+ images can be read"):
        replay.read()


class FakeCapture:
    """cv2.VideoCapture stand-in that opens and reads a 2x2 frame; tests override one behaviour.
    `opens` (set per subclass) records every open."""
    opens: list

    def __init__(self, target, api, params):
        self.opens.append(target)

    def isOpened(self):
        return True

    def read(self):
        return True, np.zeros((2, 2), np.uint8)

    def set(self, *args):
        return True

    def release(self):
        pass


def test_opencv_source_reconnects_after_a_driver_error():
    class RaisingOnceCapture(FakeCapture):
        opens = []

        def read(self):
            if len(self.opens) == 1:
                raise cv2.error("driver lost the device")
            return super().read()
    waits = []
    source = OpenCVSource(1, sleep=waits.append, opener=RaisingOnceCapture)
    assert source.read() is None and source.read() is not None
    assert len(RaisingOnceCapture.opens) == 2 and waits == [0.5]


def test_opencv_source_backs_off_on_a_missing_file(tmp_path):
    waits = []
    source = OpenCVSource(str(tmp_path / "missing.mp4"), sleep=waits.append)
    assert [source.read() for _ in range(9)] == [None] * 9
    assert waits == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    source.close()
    limited = OpenCVSource(str(tmp_path / "missing.mp4"), sleep=waits.append, max_failures=3)
    assert limited.read() is None and limited.read() is None
    with pytest.raises(CaptureError, match="no frames after 3 attempts"):
        limited.read()


def test_opencv_source_reconnects_and_resets_the_backoff():
    class ComesBackCapture(FakeCapture):
        opens = []

        def isOpened(self):
            return len(self.opens) >= 3           # the camera comes back on the third try
    waits = []
    source = OpenCVSource(1, sleep=waits.append, opener=ComesBackCapture)
    results = [source.read() for _ in range(3)]
    assert results[:2] == [None, None] and results[2] is not None
    assert waits == [0.5, 1.0] and source.backoff == 0.5 and source.failures == 0


def test_grabber_stops_promptly_while_a_camera_is_backing_off(tmp_path):
    grabber = LatestFrameGrabber(OpenCVSource(str(tmp_path / "missing.mp4")), max_fps=30)
    time.sleep(0.7)                             # inside the second backoff wait (1 s)
    started = time.monotonic()
    grabber.stop()
    assert time.monotonic() - started < 2 and not grabber._thread.is_alive()
    assert grabber.captured == 0 and grabber.source.failures >= 1
    assert threading.active_count() < 50


def test_a_recording_is_paced_by_the_consumer_and_nothing_is_dropped(frames_folder):
    grabber = LatestFrameGrabber(FolderReplay(frames_folder))
    taken = []
    for _ in range(6):
        time.sleep(0.02)                        # slower than the folder can be read
        taken.append(grabber.get(timeout=2)[0])
    grabber.stop()
    assert taken == [1, 2, 3, 4, 5, 6] and grabber.dropped == 0
    assert grabber.captured <= len(taken) + 1   # at most one frame read ahead


def test_a_video_file_is_a_recording_and_a_camera_is_live(tmp_path):
    video = tmp_path / "line.mp4"
    video.write_bytes(b"")
    assert OpenCVSource(str(video), sleep=lambda s: None).live is False
    assert OpenCVSource(0, sleep=lambda s: None).live is True
    assert OpenCVSource("rtsp://camera.local/stream", sleep=lambda s: None).live is True
