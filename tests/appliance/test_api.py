"""Request-size and header checks of the HTTP API, on a stub appliance (no model needed)."""
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from appliance.api import MAX_IMAGE_BYTES, create_api

MB = 1024 * 1024


class StubAppliance:
    """Records the frames it is asked to inspect and answers a fixed verdict."""

    def __init__(self):
        self.frames = []

    def inspect(self, frame, candidates, only, source):
        self.frames.append(frame)
        decision = SimpleNamespace(verdict="ok", p_best=0.9, flagged=False, reasons=[], ranking=[("ok", 1.0)])
        return 7, SimpleNamespace(decision=decision, model_version=1, latency_ms=1.0)


@pytest.fixture
def appliance():
    return StubAppliance()


@pytest.fixture
def client(appliance):
    return TestClient(create_api(appliance))


def chunks(total_bytes, head=b"", tail=b""):
    """A body sent chunked (no Content-Length header), 1 MB at a time."""
    yield head
    for _ in range(total_bytes // MB):
        yield b"\0" * MB
    yield tail


def test_a_non_numeric_content_length_is_a_clear_400(client, appliance):
    for value in ("abc", "-5", "1e3"):
        r = client.post("/v1/score", content=b"x", headers={"content-length": value, "content-type": "image/png"})
        assert r.status_code == 400, r.text
        assert "Content-Length" in r.json()["error"]
    assert appliance.frames == []


def test_a_chunked_raw_upload_over_the_limit_is_refused_with_413(client, appliance):
    r = client.post("/v1/score", content=chunks(MAX_IMAGE_BYTES + 2 * MB), headers={"content-type": "image/png"})
    assert r.status_code == 413, r.text
    assert "too large" in r.json()["error"]
    assert appliance.frames == []


def test_a_chunked_multipart_upload_over_the_limit_is_refused_with_413(client, appliance):
    head = (b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"f.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n")
    r = client.post("/v1/score", content=chunks(MAX_IMAGE_BYTES + 2 * MB, head, b"\r\n--B--\r\n"),
                    headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 413, r.text
    assert appliance.frames == []


def test_a_chunked_raw_upload_under_the_limit_is_inspected(client, appliance):
    frame = np.full((16, 16), 77, np.uint8)
    data = cv2.imencode(".png", frame)[1].tobytes()
    r = client.post("/v1/score", content=iter([data[:10], data[10:]]), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.json()["inspection_id"] == 7
    assert len(appliance.frames) == 1 and int(appliance.frames[0][0, 0]) == 77
