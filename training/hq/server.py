"""HQ: the server the appliance fleet talks to.

    POST /v1/appliances/{id}/feedback   operator reviews and preference pairs (idempotent)
    HEAD|PUT /v1/frames/{sha256}        frames, content-addressed
    GET  /v1/lines/{line}/manifest      the latest published manifest.json (+ X-Bundle-Version)
    GET  /v1/lines/{line}/bundles/{version}/{path}   bundle files, HTTP Range supported
    POST /v1/appliances/{id}/status     model version, flag rate, backlog, install result,
                                        precision, golden-set check, platform (CPU, ISA, onnxruntime)
    GET  /v1/whoami                     the appliance a token belongs to
    GET  /v1/fleet                      per-appliance overview (admin token)
    GET  /healthz                       no auth

What HQ keeps and where (the state directory, its database, appliance tokens) is
training/hq/state.py; publishing bundles is training/hq/publish.py. Here: the routes, and
storing what the appliances send.

No torch here: this module is imported by the `linejudge hq` commands and by tests.
"""
from __future__ import annotations

import hmac
import json
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from models.common import to_iso, write_file_atomic
from models import bundle as lib
from training.hq.publish import bundle_dir_of, latest_bundle, latest_bundles
from training.hq.state import (NAME_RE, SHA256_RE, HQState, appliance_for_token, fleet, frame_path, init_state,
                               sha256_hex)

MAX_FEEDBACK_BYTES = 8 * 1024 * 1024
MAX_FRAME_BYTES = 32 * 1024 * 1024
MAX_STATUS_BYTES = 64 * 1024
MAX_BATCH_RECORDS = 500
MAX_KEY_CHARS = 200


# ---------------------------------------------------------------- request helpers

def unsafe_path(path: str) -> bool:
    """A requested bundle file path the bundle's own path rule refuses, or one still holding a
    percent sign (a second round of URL decoding); manifest.json and manifest.sig are served."""
    return "%" in path or (path not in lib.RESERVED and lib.path_problem(path) is not None)


def _bad(status: int, detail: str, headers: dict | None = None):
    raise HTTPException(status_code=status, detail=detail, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        _bad(413, f"body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            _bad(413, f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_json(request: Request, limit: int):
    body = await _read_body(request, limit)
    try:
        return body, json.loads(body)
    except ValueError:
        _bad(400, "request body is not valid JSON")


def _bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        _bad(401, "missing bearer token: send 'Authorization: Bearer <token>'", {"WWW-Authenticate": "Bearer"})
    return token.strip()


def _authenticate(hq: HQState, request: Request) -> str:
    appliance = appliance_for_token(hq, _bearer(request))
    if appliance is None:
        _bad(401, "unknown token: register the appliance with 'linejudge hq add-appliance' and "
                  "put the token in its hq_token_file", {"WWW-Authenticate": "Bearer"})
    return appliance


def _authorize(hq: HQState, request: Request, appliance_id: str) -> str:
    who = _authenticate(hq, request)
    if not hmac.compare_digest(who.encode(), appliance_id.encode()):
        _bad(403, f"this token belongs to appliance {who!r}, not {appliance_id!r}")
    return who


def _check_line(line: str) -> None:
    if not NAME_RE.match(line):
        _bad(400, f"invalid line name {line!r}")


# ---------------------------------------------------------------- storing what appliances send

def _validate_record(record) -> str | None:
    if not isinstance(record, dict):
        return "record is not an object"
    key, kind, payload = record.get("idempotency_key"), record.get("kind"), record.get("payload")
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS or "\x00" in key:
        return f"idempotency_key must be a string of 1-{MAX_KEY_CHARS} characters (no NUL)"
    if not isinstance(kind, str) or not 0 < len(kind) <= 64 or "\x00" in kind:
        return "kind must be a string of 1-64 characters (no NUL)"
    if not isinstance(payload, dict):
        return "payload must be a JSON object"
    return None


def _store_feedback(hq: HQState, appliance_id: str, batch_key: str, body: bytes, records: list) -> dict:
    digest = sha256_hex(body)
    with hq.db.connect() as db, db.write(lock=f"feedback:{appliance_id}"):
        seen = db.one("SELECT body_sha256, response FROM batches WHERE appliance_id = ? AND batch_key = ?",
                      [appliance_id, batch_key])
        if seen:
            if seen[0] != digest:
                _bad(409, f"Idempotency-Key {batch_key!r} was used before for a different batch; "
                          "use a new key for new content")
            return {**json.loads(seen[1]), "replayed": True}
        now = to_iso()
        accepted, duplicates, rejected, stored = [], [], [], 0
        for record in records:
            why = _validate_record(record)
            if why:
                key = record.get("idempotency_key") if isinstance(record, dict) else None
                rejected.append({"idempotency_key": key if isinstance(key, str) else None, "reason": why})
                continue
            cur = db.execute("INSERT INTO feedback (appliance_id, idempotency_key, kind, payload, "
                             "batch_key, received_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                             [appliance_id, record["idempotency_key"], record["kind"],
                              json.dumps(record["payload"], sort_keys=True), batch_key, now])
            accepted.append(record["idempotency_key"])
            if cur.rowcount == 1:
                stored += 1
            else:
                duplicates.append(record["idempotency_key"])
        response = {"accepted": accepted, "stored": stored, "duplicates": duplicates, "rejected": rejected}
        db.execute("INSERT INTO batches VALUES (?, ?, ?, ?, ?)",
                   [appliance_id, batch_key, digest, json.dumps(response), now])
        db.execute("UPDATE appliances SET last_seen = ? WHERE appliance_id = ?", [now, appliance_id])
    return {**response, "replayed": False}


def _as(value, kinds, what):
    if value is None or (isinstance(value, kinds) and not isinstance(value, bool)):
        return value
    _bad(400, f"status field {what} has the wrong type")


def _store_status(hq: HQState, appliance_id: str, status: dict) -> None:
    model_version = _as(status.get("model_version"), int, "model_version")
    flag_rate = _as(status.get("flag_rate"), (int, float), "flag_rate")
    backlog = _as(status.get("backlog"), int, "backlog")
    inspections = _as(status.get("inspections"), int, "inspections")
    for name in ("install", "golden", "platform"):
        if status.get(name) is not None and not isinstance(status[name], dict):
            _bad(400, f"status field {name} must be an object")
    install = status.get("install")
    now = to_iso()
    with hq.db.connect() as db, db.write():
        db.execute("UPDATE appliances SET last_seen = ?, model_version = coalesce(?, model_version), "
                   "flag_rate = coalesce(?, flag_rate), backlog = coalesce(?, backlog), "
                   "inspections = coalesce(?, inspections), last_status = ?, "
                   "last_install = coalesce(?, last_install) WHERE appliance_id = ?",
                   [now, model_version, flag_rate, backlog, inspections, json.dumps(status),
                    json.dumps(install) if install else None, appliance_id])
        if install:
            version = install.get("version")
            db.execute("INSERT INTO installs (appliance_id, ts, version, state, reason) VALUES (?, ?, ?, ?, ?)",
                       [appliance_id, now, version if isinstance(version, int) else None,
                        str(install.get("state", "")).replace("\x00", "")[:64],
                        str(install.get("reason", "")).replace("\x00", "")[:2000]])


# ---------------------------------------------------------------- the app

def create_hq_app(state: HQState | Path, admin_token: str | None = None) -> FastAPI:
    """The HQ API over a state (a directory means SQLite in it). GET /v1/fleet needs admin_token
    (disabled when None)."""
    hq = init_state(state)
    app = FastAPI(title="linejudge HQ", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hq = hq
    app.add_exception_handler(HTTPException, _http_error)
    _identity_routes(app, hq)
    _report_routes(app, hq)
    _frame_routes(app, hq)
    _bundle_routes(app, hq)
    _fleet_route(app, hq, admin_token)
    return app


async def _http_error(_, exc: HTTPException):
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def _identity_routes(app: FastAPI, hq: HQState) -> None:
    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/v1/whoami")
    def whoami(request: Request):
        return {"appliance_id": _authenticate(hq, request)}


def _report_routes(app: FastAPI, hq: HQState) -> None:
    """What an appliance reports about itself: feedback batches and its status."""
    @app.post("/v1/appliances/{appliance_id}/feedback")
    async def feedback(appliance_id: str, request: Request):
        await run_in_threadpool(_authorize, hq, request, appliance_id)
        batch_key = request.headers.get("idempotency-key", "").strip()
        if not batch_key or len(batch_key) > MAX_KEY_CHARS:
            _bad(400, f"send the batch's Idempotency-Key header (1-{MAX_KEY_CHARS} characters)")
        body, data = await _read_json(request, MAX_FEEDBACK_BYTES)
        records = data.get("records") if isinstance(data, dict) else None
        if not isinstance(records, list):
            _bad(400, 'body must be {"records": [{"idempotency_key", "kind", "payload"}, ...]}')
        if len(records) > MAX_BATCH_RECORDS:
            _bad(413, f"{len(records)} records in one batch; send at most {MAX_BATCH_RECORDS}")
        return await run_in_threadpool(_store_feedback, hq, appliance_id, batch_key, body, records)

    @app.post("/v1/appliances/{appliance_id}/status")
    async def status(appliance_id: str, request: Request):
        await run_in_threadpool(_authorize, hq, request, appliance_id)
        _, data = await _read_json(request, MAX_STATUS_BYTES)
        if not isinstance(data, dict):
            _bad(400, "status must be a JSON object")
        await run_in_threadpool(_store_status, hq, appliance_id, data)
        return {"ok": True, "server_time": to_iso()}


def _frame_routes(app: FastAPI, hq: HQState) -> None:
    def frame_target(sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            _bad(400, "a frame is addressed by its sha256: 64 hex characters")
        return frame_path(hq, sha256)

    @app.head("/v1/frames/{sha256}")
    def frame_exists(sha256: str, request: Request):
        _authenticate(hq, request)
        return Response(status_code=200 if frame_target(sha256).is_file() else 404)

    @app.put("/v1/frames/{sha256}")
    async def put_frame(sha256: str, request: Request):
        await run_in_threadpool(_authenticate, hq, request)
        target = frame_target(sha256)
        body = await _read_body(request, MAX_FRAME_BYTES)
        actual = sha256_hex(body)
        if actual != sha256.lower():
            _bad(400, f"body sha256 is {actual}, not the {sha256} in the path; the upload was corrupted")
        if target.is_file():
            return JSONResponse({"sha256": actual, "stored": False}, status_code=200)
        await run_in_threadpool(write_file_atomic, target, body)
        return JSONResponse({"sha256": actual, "stored": True}, status_code=201)


def _bundle_routes(app: FastAPI, hq: HQState) -> None:
    """The published bundles, as publish.py left them: the latest manifest, then its files."""
    @app.get("/v1/lines/{line}/manifest")
    def manifest(line: str, request: Request):
        _authenticate(hq, request)
        _check_line(line)
        version = latest_bundle(hq, line)
        path = None if version is None else bundle_dir_of(hq, line, version) / lib.MANIFEST
        if path is None or not path.is_file():
            _bad(404, f"no bundle published for line {line!r}")
        return Response(path.read_bytes(), media_type="application/json",
                        headers={"X-Bundle-Version": str(version), "Cache-Control": "no-cache"})

    @app.api_route("/v1/lines/{line}/bundles/{version}/{path:path}", methods=["GET", "HEAD"])
    def bundle_file(line: str, version: str, path: str, request: Request):
        _authenticate(hq, request)
        _check_line(line)
        if not version.isdigit() or not version.isascii():
            _bad(400, f"bundle version must be an integer, not {version!r}")
        if unsafe_path(path):
            _bad(400, f"invalid bundle file path {path!r}")
        root = bundle_dir_of(hq, line, int(version)).resolve()
        target = root / path
        try:
            inside = target.resolve(strict=True).relative_to(root) == Path(path)
        except (OSError, ValueError):
            inside = False
        if not inside or not target.is_file():
            _bad(404, f"{path} is not a file of bundle {line} v{int(version)}")
        return FileResponse(target, media_type="application/octet-stream",
                            headers={"Cache-Control": "no-cache"})


def _fleet_route(app: FastAPI, hq: HQState, admin_token: str | None) -> None:
    @app.get("/v1/fleet")
    def fleet_view(request: Request):
        token = _bearer(request)
        if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
            lines = latest_bundles(hq)
            return {"appliances": fleet(hq), "latest_bundles": lines}
        if appliance_for_token(hq, token) is not None:
            _bad(403, "the fleet view needs the HQ admin token, not an appliance token")
        if not admin_token:
            _bad(403, "the fleet view is disabled: start HQ with an admin token (--admin-token)")
        _bad(401, "unknown token", {"WWW-Authenticate": "Bearer"})
