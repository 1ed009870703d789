"""HQ server: auth, idempotent feedback, content-addressed frames, bundle serving (Range, path tricks)."""
from __future__ import annotations

import hashlib
import json
import http.client
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from models import bundle as lib
from tests.helpers import BackgroundServer
from training.hq import server as hq
from training.hq import publish as hq_publish, state as hq_state
from training.hq.state import DB_MARKER, HQError

LINE = "el-solar"
ADMIN = "admin-secret"


def make_bundle(root: Path, private_key: Path, version: int, line: str = LINE, size: int = 40_000) -> Path:
    out = root / f"{line}-v{version}"
    (out / "golden").mkdir(parents=True)
    (out / "scorer.onnx").write_bytes(bytes((i * 7 + version) % 251 for i in range(size)))
    (out / "catalog.yaml").write_text(f"version: {version}\n")
    (out / "golden" / "expected.json").write_text("[]")
    manifest = lib.build_manifest(out, line=line, version=version, expires_days=30, compatible={"input": {}},
                                  preprocessing={}, thresholds={}, ood={}, lineage={}, metrics={})
    lib.write_manifest(out, manifest)
    lib.sign_bundle(out, private_key)
    return out


def snapshot(state: hq_state.HQState) -> dict:
    """Every file under the state dir (the database by content of its tables) -> digest."""
    files = {str(p.relative_to(state.dir)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(state.dir.rglob("*")) if p.is_file() and not p.name.startswith("hq.db")}
    with state.db.connect() as db:
        for table in ("appliances", "batches", "bundles", "installs"):
            files[table] = db.query(f"SELECT * FROM {table} ORDER BY 1, 2")
    files["feedback"] = [(r["appliance_id"], r["idempotency_key"]) for r in hq_state.feedback_records(state)]
    return files


@pytest.fixture(params=["sqlite", "postgresql"])
def env(tmp_path, request):
    """HQ on loopback with appliances a1, b2 and bundle v2 published; once on SQLite, once on PostgreSQL."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    state = hq_state.open_state(tmp_path / "hq", url)
    tokens = {"a1": hq_state.add_appliance(state, "a1"), "b2": hq_state.add_appliance(state, "b2")}
    private, public = lib.generate_keypair(tmp_path / "keys", "hq")
    bundle = make_bundle(tmp_path / "src", private, 2)
    published = hq_publish.publish_bundle(state, bundle, key_files=[public])
    with BackgroundServer(hq.create_hq_app(state, admin_token=ADMIN)) as srv, \
            httpx.Client(base_url=srv.url, timeout=10) as client:
        yield {"state": state, "tokens": tokens, "client": client, "srv": srv, "bundle": bundle,
               "published": published, "keys": (private, public), "tmp": tmp_path}
    state.close()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def raw_get(srv, path: str, token: str) -> tuple[int, bytes]:
    """http.client sends the path exactly as given (httpx would normalise dot segments)."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def batch(*keys, kind="preference"):
    return {"records": [{"idempotency_key": k, "kind": kind, "payload": {"chosen": "a", "rejected": k}}
                        for k in keys]}


# ---------------------------------------------------------------- auth

def test_tokens_are_stored_hashed(env):
    state = env["state"]
    with state.db.connect() as db:
        stored = repr(db.query("SELECT * FROM appliances")).encode()
    raw = state.db.sqlite_path.read_bytes() if state.db.sqlite_path else stored
    for token in env["tokens"].values():
        for where in (stored, raw):
            assert token.encode() not in where
            assert token.split(".", 1)[1].encode() not in where
            assert hashlib.sha256(token.encode()).hexdigest().encode() in where


def test_auth_missing_unknown_and_foreign_token(env):
    c, tok = env["client"], env["tokens"]
    url = "/v1/appliances/a1/feedback"
    headers = {"Idempotency-Key": "b-1"}
    assert c.post(url, json=batch("k1"), headers=headers).status_code == 401
    assert c.post(url, json=batch("k1"), headers={**headers, "Authorization": "Basic eDp5"}).status_code == 401
    r = c.post(url, json=batch("k1"), headers={**headers, **auth("a1.forged")})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = c.post(url, json=batch("k1"), headers={**headers, **auth(tok["b2"])})
    assert r.status_code == 403 and "b2" in r.json()["detail"]
    assert c.post("/v1/appliances/a1/status", json={"backlog": 1}, headers=auth(tok["b2"])).status_code == 403
    assert c.get(f"/v1/lines/{LINE}/manifest").status_code == 401
    assert c.get(f"/v1/lines/{LINE}/bundles/2/scorer.onnx", headers=auth("nope")).status_code == 401
    assert c.put("/v1/frames/" + "0" * 64, content=b"x").status_code == 401
    assert hq_state.feedback_records(env["state"]) == []
    assert c.post(url, json=batch("k1"), headers={**headers, **auth(tok["a1"])}).status_code == 200


def test_rotating_a_token_revokes_the_old_one(env):
    c, old = env["client"], env["tokens"]["a1"]
    new = hq_state.add_appliance(env["state"], "a1")
    assert c.get("/v1/whoami", headers=auth(old)).status_code == 401
    assert c.get("/v1/whoami", headers=auth(new)).json() == {"appliance_id": "a1"}
    with pytest.raises(HQError):
        hq_state.add_appliance(env["state"], "../evil")


def test_fleet_needs_the_admin_token(env):
    c, tok = env["client"], env["tokens"]
    assert c.get("/v1/fleet").status_code == 401
    assert c.get("/v1/fleet", headers=auth("wrong")).status_code == 401
    assert c.get("/v1/fleet", headers=auth(tok["a1"])).status_code == 403
    golden = {"ok": True, "precision": "fp32", "fallback": True, "worst_reward_delta": 0.0001,
              "int8": {"ok": False, "worst_reward_delta": 3.68, "worst_frame": "golden_06.png"}}
    platform = {"cpu": "AMD EPYC 7B12", "isa": ["avx2"], "vnni": False, "onnxruntime": "1.32.0"}
    status = {"model_version": 2, "flag_rate": 0.125, "backlog": 7, "inspections": 40,
              "install": {"version": 2, "state": "active", "reason": ""}, "precision": "fp32",
              "golden": golden, "platform": platform}
    assert c.post("/v1/appliances/a1/status", json=status, headers=auth(tok["a1"])).status_code == 200
    assert c.post("/v1/appliances/a1/status", json={"backlog": "many"}, headers=auth(tok["a1"])).status_code == 400
    assert c.post("/v1/appliances/a1/status", json={"golden": "bad"}, headers=auth(tok["a1"])).status_code == 400
    body = c.get("/v1/fleet", headers=auth(ADMIN)).json()
    a1 = next(a for a in body["appliances"] if a["appliance_id"] == "a1")
    assert (a1["model_version"], a1["flag_rate"], a1["backlog"], a1["inspections"]) == (2, 0.125, 7, 40)
    assert a1["last_seen"] and a1["last_install"]["state"] == "active"
    assert (a1["precision"], a1["golden"], a1["platform"]) == ("fp32", golden, platform)   # which boxes disagree
    assert body["latest_bundles"] == {LINE: 2}


def test_fleet_disabled_without_admin_token(tmp_path):
    state = tmp_path / "hq"
    token = hq_state.add_appliance(state, "a1")
    with BackgroundServer(hq.create_hq_app(state)) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/v1/fleet", headers=auth(token)).status_code == 403
        r = c.get("/v1/fleet", headers=auth("anything"))
        assert r.status_code == 403 and "admin token" in r.json()["detail"]


# ---------------------------------------------------------------- feedback

def test_same_batch_twice_is_stored_once(env):
    c, h = env["client"], {**auth(env["tokens"]["a1"]), "Idempotency-Key": "batch-1"}
    first = c.post("/v1/appliances/a1/feedback", json=batch("k1", "k2", "k3"), headers=h)
    again = c.post("/v1/appliances/a1/feedback", json=batch("k1", "k2", "k3"), headers=h)
    assert first.status_code == again.status_code == 200
    assert first.json()["accepted"] == again.json()["accepted"] == ["k1", "k2", "k3"]
    assert first.json()["stored"] == 3 and again.json()["replayed"] is True
    # a new batch repeating a record: acknowledged, not stored twice
    r = c.post("/v1/appliances/a1/feedback", json=batch("k3", "k4"), headers={**h, "Idempotency-Key": "batch-2"})
    assert r.json()["accepted"] == ["k3", "k4"] and r.json()["duplicates"] == ["k3"] and r.json()["stored"] == 1
    # reusing a batch key for other content is a conflict
    r = c.post("/v1/appliances/a1/feedback", json=batch("k9"), headers=h)
    assert r.status_code == 409
    # the same record key from another appliance is another record
    hb = {**auth(env["tokens"]["b2"]), "Idempotency-Key": "batch-1"}
    assert c.post("/v1/appliances/b2/feedback", json=batch("k1"), headers=hb).json()["stored"] == 1
    rows = hq_state.feedback_records(env["state"])
    assert sorted((r["appliance_id"], r["idempotency_key"]) for r in rows) == [
        ("a1", "k1"), ("a1", "k2"), ("a1", "k3"), ("a1", "k4"), ("b2", "k1")]
    assert rows[0]["payload"] == {"chosen": "a", "rejected": "k1"}
    assert hq_state.feedback_records(env["state"], kind="review") == []


def test_a_batch_sent_by_many_workers_at_once_is_stored_once(env):
    """Retries racing each other (two sync passes, a proxy replaying): every answer is the same
    acknowledgement and each record is stored once; on PostgreSQL this needs the per-appliance lock."""
    h = {**auth(env["tokens"]["a1"]), "Idempotency-Key": "race-1"}
    body = batch(*(f"r{i}" for i in range(20)))
    start = threading.Barrier(8)

    def send(_):
        with httpx.Client(base_url=env["srv"].url, timeout=30) as c:
            start.wait()
            return c.post("/v1/appliances/a1/feedback", json=body, headers=h)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, range(8)))
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
    assert sorted(r.json()["replayed"] for r in answers) == [False] + [True] * 7
    assert {tuple(r.json()["accepted"]) for r in answers} == {tuple(f"r{i}" for i in range(20))}
    assert sorted(r["idempotency_key"] for r in hq_state.feedback_records(env["state"])) == sorted(f"r{i}" for i in range(20))


def test_feedback_validation(env):
    c, h = env["client"], auth(env["tokens"]["a1"])
    url = "/v1/appliances/a1/feedback"
    assert c.post(url, json=batch("k1"), headers=h).status_code == 400           # no Idempotency-Key
    h = {**h, "Idempotency-Key": "b"}
    assert c.post(url, content=b"{not json", headers=h).status_code == 400
    assert c.post(url, json={"rows": []}, headers=h).status_code == 400
    body = {"records": [{"idempotency_key": "ok", "kind": "review", "payload": {}},
                        {"idempotency_key": "", "kind": "review", "payload": {}},
                        {"idempotency_key": "bad-payload", "kind": "review", "payload": [1]},
                        {"idempotency_key": "nul\x00key", "kind": "review", "payload": {}}, "junk"]}
    r = c.post(url, json=body, headers=h).json()
    assert r["accepted"] == ["ok"] and len(r["rejected"]) == 4        # PostgreSQL text cannot hold NUL
    assert [x["idempotency_key"] for x in hq_state.feedback_records(env["state"], kind="review")] == ["ok"]
    too_many = batch(*[f"k{i}" for i in range(hq.MAX_BATCH_RECORDS + 1)])
    assert c.post(url, json=too_many, headers={**h, "Idempotency-Key": "big"}).status_code == 413


# ---------------------------------------------------------------- frames

def test_frames_are_content_addressed(env):
    c, h = env["client"], auth(env["tokens"]["a1"])
    data = os.urandom(5000)
    sha = hashlib.sha256(data).hexdigest()
    assert c.head(f"/v1/frames/{sha}", headers=h).status_code == 404
    assert c.put(f"/v1/frames/{sha}", content=data, headers=h).status_code == 201
    assert c.put(f"/v1/frames/{sha}", content=data, headers=h).status_code == 200
    assert c.head(f"/v1/frames/{sha}", headers=h).status_code == 200
    assert hq_state.frame_path(env["state"], sha).read_bytes() == data
    before = snapshot(env["state"])
    other = hashlib.sha256(b"other").hexdigest()
    r = c.put(f"/v1/frames/{other}", content=data, headers=h)
    assert r.status_code == 400 and sha in r.json()["detail"]
    for bad in ("abc", "g" * 64, "0" * 63, "0" * 65):
        assert c.put(f"/v1/frames/{bad}", content=data, headers=h).status_code == 400
    status, _ = raw_get(env["srv"], "/v1/frames/..%2f..%2fhq.db", env["tokens"]["a1"])
    assert status in (400, 404, 405)
    assert snapshot(env["state"]) == before


def test_feedback_records_point_at_uploaded_frames(env):
    c, h = env["client"], auth(env["tokens"]["a1"])
    data = b"png bytes"
    sha = hashlib.sha256(data).hexdigest()
    c.put(f"/v1/frames/{sha}", content=data, headers=h)
    rec = {"records": [{"idempotency_key": "r1", "kind": "review", "payload": {"frame_sha256": sha}}]}
    c.post("/v1/appliances/a1/feedback", json=rec, headers={**h, "Idempotency-Key": "x"})
    [row] = hq_state.feedback_records(env["state"])
    assert Path(row["frame_file"]).read_bytes() == data


# ---------------------------------------------------------------- bundles

def test_manifest_is_the_latest_published(env):
    c, h = env["client"], auth(env["tokens"]["a1"])
    r = c.get(f"/v1/lines/{LINE}/manifest", headers=h)
    assert r.status_code == 200 and r.headers["x-bundle-version"] == "2"
    assert r.content == (env["bundle"] / lib.MANIFEST).read_bytes()
    assert c.get("/v1/lines/other-line/manifest", headers=h).status_code == 404
    v3 = make_bundle(env["tmp"] / "src", env["keys"][0], 3)
    hq_publish.publish_bundle(env["state"], v3)
    assert c.get(f"/v1/lines/{LINE}/manifest", headers=h).headers["x-bundle-version"] == "3"
    with pytest.raises(HQError, match="must increase"):
        hq_publish.publish_bundle(env["state"], make_bundle(env["tmp"] / "old", env["keys"][0], 1))
    with pytest.raises(HQError, match="must increase"):
        hq_publish.publish_bundle(env["state"], v3)


def test_publish_refuses_broken_bundles(env):
    private, public = env["keys"]
    bad = make_bundle(env["tmp"] / "bad", private, 5)
    (bad / "scorer.onnx").write_bytes(b"changed after signing")
    with pytest.raises(HQError):
        hq_publish.publish_bundle(env["state"], bad)
    unsigned = make_bundle(env["tmp"] / "unsigned", private, 6)
    (unsigned / lib.SIGNATURE).unlink()
    with pytest.raises(HQError, match="sign"):
        hq_publish.publish_bundle(env["state"], unsigned)
    extra = make_bundle(env["tmp"] / "extra", private, 7)
    (extra / "stray.txt").write_text("not listed")
    dest = hq_publish.publish_bundle(env["state"], extra, key_files=None)
    assert not (dest / "stray.txt").exists() and (dest / "scorer.onnx").exists()


def test_range_request_returns_206(env):
    c, h = env["client"], auth(env["tokens"]["a1"])
    data = (env["bundle"] / "scorer.onnx").read_bytes()
    url = f"/v1/lines/{LINE}/bundles/2/scorer.onnx"
    full = c.get(url, headers=h)
    assert full.status_code == 200 and full.content == data and full.headers["accept-ranges"] == "bytes"
    part = c.get(url, headers={**h, "Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == data[1000:2000]
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    tail = c.get(url, headers={**h, "Range": f"bytes={len(data) - 10}-"})
    assert tail.status_code == 206 and tail.content == data[-10:]
    assert c.get(url, headers={**h, "Range": f"bytes={len(data) + 5}-"}).status_code == 416
    nested = c.get(f"/v1/lines/{LINE}/bundles/2/golden/expected.json", headers=h)
    assert nested.status_code == 200 and nested.content == b"[]"
    assert c.get(f"/v1/lines/{LINE}/bundles/2/missing.onnx", headers=h).status_code == 404
    assert c.get(f"/v1/lines/{LINE}/bundles/9/scorer.onnx", headers=h).status_code == 404


@pytest.mark.parametrize("path", [
    f"/v1/lines/{LINE}/bundles/2/../../../../hq.db",
    f"/v1/lines/{LINE}/bundles/2/golden/../../2/scorer.onnx",
    f"/v1/lines/{LINE}/bundles/2/..%2f..%2f..%2f..%2fhq.db",
    f"/v1/lines/{LINE}/bundles/2/%2e%2e/%2e%2e/%2e%2e/%2e%2e/hq.db",
    f"/v1/lines/{LINE}/bundles/2/%252e%252e/%252e%252e/hq.db",
    f"/v1/lines/{LINE}/bundles/2/..%5c..%5c..%5chq.db",
    f"/v1/lines/{LINE}/bundles/2/golden%5cexpected.json",
    f"/v1/lines/{LINE}/bundles/2//etc/passwd",
    f"/v1/lines/{LINE}/bundles/2/%2fetc%2fpasswd",
    f"/v1/lines/{LINE}/bundles/2/./scorer.onnx",
    f"/v1/lines/{LINE}/bundles/2/scorer.onnx%00.txt",
    f"/v1/lines/{LINE}/bundles/../../hq.db",
    f"/v1/lines/{LINE}/bundles/-1/scorer.onnx",
    f"/v1/lines/%2e%2e/bundles/2/scorer.onnx",
    "/v1/lines/..%2f..%2fbundles/2/scorer.onnx",
])
def test_path_tricks_are_refused(env, path):
    before = snapshot(env["state"])
    status, body = raw_get(env["srv"], path, env["tokens"]["a1"])
    assert status in (400, 404)          # 400 wherever the route matched; 404 if no route did
    assert b"SQLite" not in body and b"root:" not in body and body != (env["bundle"] / "scorer.onnx").read_bytes()
    if not path.startswith("/v1/lines/..%2f"):   # the one where no route matches at all
        assert status == 400, body
    assert snapshot(env["state"]) == before


def test_links_out_of_the_bundle_are_not_served(env):
    (env["published"] / "secret").symlink_to(env["state"].dir / "hq.db")
    (env["published"] / "dir").symlink_to(env["state"].dir)
    for path in ("secret", "dir/hq.db"):
        status, body = raw_get(env["srv"], f"/v1/lines/{LINE}/bundles/2/{path}", env["tokens"]["a1"])
        assert status == 404 and b"SQLite" not in body


# ---------------------------------------------------------------- which database

def test_a_state_dir_remembers_its_database(tmp_path, postgres_url):
    """A command run without the URL must not quietly start a second, empty SQLite HQ."""
    state = hq_state.open_state(tmp_path / "hq", postgres_url)
    hq_state.add_appliance(state, "a1")
    state.close()
    with pytest.raises(HQError, match="PostgreSQL|postgresql://postgres@") as err:
        hq_state.add_appliance(tmp_path / "hq", "a2")
    assert "--database-url" in str(err.value)
    assert not (tmp_path / "hq" / "hq.db").exists()
    again = hq_state.open_state(tmp_path / "hq", postgres_url)
    assert [a["appliance_id"] for a in hq_state.fleet(again)] == ["a1"]
    again.close()


def test_unreachable_database_is_a_clear_error_without_the_password(tmp_path):
    import socket
    from training.hq.db import HQDatabaseError
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                  # nothing listens here
    state = hq_state.open_state(tmp_path / "hq", f"postgresql://hq:s3cret@127.0.0.1:{port}/fleet")
    with pytest.raises(HQDatabaseError) as err:
        hq_state.add_appliance(state, "a1")
    assert f"127.0.0.1:{port}" in str(err.value) and "s3cret" not in str(err.value)
    assert not (tmp_path / "hq" / DB_MARKER).exists()      # not bound to a database it never reached
    with pytest.raises(HQDatabaseError, match="postgresql://"):
        hq_state.open_state(tmp_path / "other", "mysql://root@db/hq")


@pytest.mark.parametrize("url", [
    "postgresql://hq:s3cret@127.0.0.1:1/fleet",
    "postgresql://hq@127.0.0.1:1/fleet?password=s3cret&sslmode=disable",
    "postgresql://hq:s3%zzcret@127.0.0.1:1/fleet",
    "postgresql://hq:s3cret@db:54x2/fleet",
    "host=db password=s3cret",
])
def test_the_password_never_reaches_a_message_or_the_marker(tmp_path, url):
    from training.hq.db import HQDatabaseError, redact
    assert "s3cret" not in redact(url)
    with pytest.raises(HQDatabaseError) as err:
        hq_state.add_appliance(hq_state.open_state(tmp_path / "hq", url), "a1")
    assert "s3cret" not in str(err.value) and "Traceback" not in str(err.value)
    assert not (tmp_path / "hq" / DB_MARKER).exists()


def test_an_existing_sqlite_hq_is_not_switched_to_an_empty_database(tmp_path, postgres_url):
    hq_state.add_appliance(tmp_path / "hq", "a1")
    (tmp_path / "hq" / DB_MARKER).unlink()        # as made before the marker existed
    with pytest.raises(HQError, match="SQLite"):
        hq_state.open_state(tmp_path / "hq", postgres_url)


def test_a_user_without_create_rights_gets_told_what_to_grant(tmp_path, postgres_url):
    import secrets
    import psycopg
    from training.hq.db import HQDatabaseError
    role = f"nocreate_{secrets.token_hex(4)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN")
    limited = postgres_url.replace("postgresql://postgres@", f"postgresql://{role}@")
    with pytest.raises(HQDatabaseError, match="GRANT CREATE"):
        hq_state.add_appliance(hq_state.open_state(tmp_path / "hq", limited), "a1")


def test_big_counters_fit_on_both_stores(env):
    c, h = env["client"], auth(env["tokens"]["a1"])
    status = {"inspections": 2 ** 40, "backlog": 2 ** 33, "flag_rate": 0.123456789012}
    assert c.post("/v1/appliances/a1/status", json=status, headers=h).status_code == 200
    row = next(a for a in hq_state.fleet(env["state"]) if a["appliance_id"] == "a1")
    assert row["inspections"] == 2 ** 40 and row["backlog"] == 2 ** 33
    assert row["flag_rate"] == pytest.approx(0.123456789012, abs=1e-12)


def test_hq_commands_take_the_database_from_the_environment(tmp_path, postgres_url):
    """What systemd/hq.service does: the URL (with its password) comes from the environment."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[2]

    def cli(*args, url=None):
        env = {k: v for k, v in os.environ.items() if k != "LINEJUDGE_HQ_DATABASE_URL"}
        if url:
            env["LINEJUDGE_HQ_DATABASE_URL"] = url
        return subprocess.run([sys.executable, "-m", "linejudge_cli", "hq", "add-appliance",
                               "--state-dir", str(tmp_path / "hq"), *args], capture_output=True, text=True,
                              timeout=120, cwd=root, env=env)

    added = cli("--appliance", "cam1", url=postgres_url)
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip().rsplit(" ", 1)[-1]
    state = hq_state.open_state(tmp_path / "hq", postgres_url)
    assert hq_state.appliance_for_token(state, token) == "cam1"
    state.close()
    forgot = cli("--appliance", "cam2")
    assert forgot.returncode == 2 and "LINEJUDGE_HQ_DATABASE_URL" in forgot.stderr
    assert "Traceback" not in forgot.stderr


@pytest.mark.parametrize("path", ["../../hq.db", "/etc/passwd", "golden/../scorer.onnx"])
def test_publish_refuses_an_unsafe_path_through_the_bundle_check(env, path):
    """HQ publishes through models.bundle's one manifest and file check, not its own."""
    private, _ = env["keys"]
    bundle = make_bundle(env["tmp"] / "unsafe", private, 8)
    manifest = json.loads((bundle / lib.MANIFEST).read_text())
    manifest["files"].append({"path": path, "bytes": 1, "sha256": "0" * 64})
    lib.write_manifest(bundle, manifest)
    before = hq_publish.latest_bundle(env["state"], manifest["line"])
    with pytest.raises(HQError, match="not publishing.*" + re.escape(repr(path))):
        hq_publish.publish_bundle(env["state"], bundle)
    assert hq_publish.latest_bundle(env["state"], manifest["line"]) == before < 8
