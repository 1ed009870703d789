"""The appliance end to end on the tiny bundle: judge, log, serve the API, survive bad input."""
import io
import json
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from appliance.api import create_api
from appliance.config import config_from_dict
from models.errors import ModelError
from appliance.service import Appliance


@pytest.fixture(scope="module")
def appliance(tiny_bundle, tmp_path_factory):
    bundle, public, _ = tiny_bundle
    state = tmp_path_factory.mktemp("state")
    cfg = config_from_dict({"state_dir": str(state), "bundle": str(bundle), "trusted_keys": [str(public)],
                            "operator_pins": {"ana": "2468"}, "max_fps": 50})
    app = Appliance(cfg)
    yield app
    app.stop()


def png(frame) -> bytes:
    return cv2.imencode(".png", frame)[1].tobytes()


def test_inspection_is_committed_with_scores_and_model_version(appliance):
    frame = np.random.default_rng(0).integers(0, 255, (300, 300), np.uint8)
    inspection_id, judgement = appliance.inspect(frame)
    row = appliance.store.inspection(inspection_id)
    assert row["verdict"] == judgement.decision.verdict
    assert row["model_version"] == 1
    assert len(row["scores"]) == 8
    assert appliance.frame_file(row["frame_path"]).exists()


def test_untrusted_bundle_is_refused(tiny_bundle, tmp_path):
    bundle, _, _ = tiny_bundle
    from models import bundle as lib
    _, other = lib.generate_keypair(tmp_path, "someone-else")
    cfg = config_from_dict({"state_dir": str(tmp_path / "s"), "bundle": str(bundle), "trusted_keys": [str(other)]})
    with pytest.raises(ModelError, match="rejected"):
        Appliance(cfg)


def test_loop_inspects_replayed_frames(appliance, tmp_path):
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((64, 64), 40 * i, np.uint8))
    from dataclasses import replace
    appliance.cfg = replace(appliance.cfg, source=str(tmp_path))
    before = appliance.store.stats()["inspections"]
    appliance.start()
    deadline = time.time() + 30
    while appliance.store.stats()["inspections"] < before + 3 and time.time() < deadline:
        time.sleep(0.2)
    assert appliance.store.stats()["inspections"] >= before + 3
    assert appliance.live.judgement is not None


@pytest.fixture(scope="module")
def client(appliance):
    return TestClient(create_api(appliance))


def test_score_endpoint_ranks_catalog_and_free_text(client):
    frame = png(np.full((120, 120, 3), 128, np.uint8))
    r = client.post("/v1/score", files={"image": ("f.png", frame, "image/png")},
                    data={"candidates": json.dumps(["a long crack across the cell"])})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["ranking"]) == 9 and body["verdict"] == body["ranking"][0]["text"]
    assert 0.5 <= body["p_best"] <= 1.0


@pytest.mark.parametrize("files,data,status,words", [
    ({"image": ("f.png", b"not an image", "image/png")}, {}, 400, "could not be decoded"),
    ({"image": ("f.png", b"", "image/png")}, {}, 400, "empty"),
    ({"image": ("f.png", png(np.zeros((8, 8), np.uint8)), "image/png")}, {"candidates": "x" * 1_000_000}, 400, "candidates must be"),
    ({"image": ("f.png", png(np.zeros((8, 8), np.uint8)), "image/png")}, {"candidates": json.dumps(["x" * 1_000_000])}, 400, "characters"),
    ({"image": ("f.png", png(np.zeros((8, 8), np.uint8)), "image/png")}, {"candidates": "[\"a\", "}, 400, "JSON list"),
    ({}, {"candidates": "[]"}, 400, "file field named 'image'"),
])
def test_bad_requests_get_clear_4xx(client, files, data, status, words):
    r = client.post("/v1/score", files=files or None, data=data)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


def test_wrong_channel_frames(client):
    from PIL import Image
    from models.errors import BadFrame
    from models.preprocess import to_gray
    with pytest.raises(BadFrame, match="channels"):
        to_gray(np.zeros((8, 8, 2), np.uint8))
    buffer = io.BytesIO()   # gray + alpha decodes to 4 channels: converted, not refused
    Image.fromarray(np.zeros((32, 32, 2), np.uint8), "LA").save(buffer, "PNG")
    r = client.post("/v1/score", files={"image": ("la.png", buffer.getvalue(), "image/png")})
    assert r.status_code == 200


def test_invalid_utf8_and_json_body(client):
    r = client.post("/v1/score", content=b"\xff\xfe\xfa", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500
    r = client.post("/v1/score?candidates=%FF%FE", content=png(np.zeros((8, 8), np.uint8)),
                    headers={"content-type": "image/png"})
    assert 400 <= r.status_code < 500
    assert client.get("/metrics").status_code == 200      # still serving


def test_metrics_and_health(client):
    text = client.get("/metrics").text
    assert "linejudge_frames_total" in text and "linejudge_model_version 1.0" in text
    assert client.get("/healthz").json()["model_version"] == 1


def test_appliance_path_never_imports_torch(tiny_bundle):
    code = ("import sys, appliance.server, appliance.service, appliance.api, appliance.ui, appliance.runtime;"
            "bad=[m for m in ('torch','transformers','optimum') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("how", ["query", "multipart", "urlencoded"])
def test_candidates_that_are_not_utf8_are_refused_not_mangled(client, how):
    """Latin-1 bytes (\\xff\\xfe) in a candidate: 400, never scored as 'ÿþ crack' or U+FFFD."""
    frame = png(np.full((32, 32), 90, np.uint8))
    bad = b'["\xff\xfe crack"]'
    if how == "query":
        r = client.post("/v1/score?candidates=%5B%22%FF%FE%20crack%22%5D", content=frame,
                        headers={"content-type": "image/png"})
    elif how == "multipart":
        boundary = b"linejudge-test"
        body = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="candidates"\r\n\r\n' + bad +
                b"\r\n--" + boundary + b'\r\nContent-Disposition: form-data; name="image"; filename="f.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + frame + b"\r\n--" + boundary + b"--\r\n")
        r = client.post("/v1/score", content=body,
                        headers={"content-type": "multipart/form-data; boundary=linejudge-test"})
    else:
        r = client.post("/v1/score", content=b"candidates=%5B%22%FF%FE%20crack%22%5D",
                        headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "UTF-8" in r.json()["error"], (r.status_code, r.text)


def test_utf8_candidates_in_a_form_are_scored_and_a_wrong_method_is_405(client):
    frame = png(np.full((32, 32), 90, np.uint8))
    r = client.post("/v1/score", files={"image": ("f.png", frame, "image/png")},
                    data={"candidates": json.dumps(["Riß im Glas, oben links"])})
    assert r.status_code == 200 and any(row["text"] == "Riß im Glas, oben links" for row in r.json()["ranking"])
    assert client.get("/v1/score").status_code == 405
    assert client.put("/healthz").status_code == 405
