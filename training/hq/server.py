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

State lives under one directory: frames/ab/<sha256>, bundles/<line>/<version>/ (published,
signed bundles; never modified once published) and the records (appliances, feedback, batches,
bundles, installs) in hq.db (SQLite, WAL) or, for fleet scale, in PostgreSQL given by a
database URL (training/hq/db.py). Appliance tokens are random, shown once by add_appliance, and
stored only as sha256. Every write is one transaction that locks what it reads first.

No torch here: this module is imported by the `linejudge hq` commands and by tests.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from appliance.errors import LinejudgeError
from models import bundle as lib
from training.hq.db import HQDatabase, redact

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")     # appliance ids and line names
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
MAX_FEEDBACK_BYTES = 8 * 1024 * 1024
MAX_FRAME_BYTES = 32 * 1024 * 1024
MAX_STATUS_BYTES = 64 * 1024
MAX_BATCH_RECORDS = 500
MAX_KEY_CHARS = 200

DB_MARKER = "database"            # in the state dir: which database holds its records
DEFAULT_DB = "sqlite:hq.db"


class HQError(LinejudgeError):
    """An HQ operation (publishing, adding an appliance) cannot be done as asked."""


# ---------------------------------------------------------------- state: files + database

class HQState:
    """One HQ: its directory (frames/, bundles/) and the database of its records.

    A bare path means the default, SQLite in <dir>/hq.db. The directory remembers which
    database it was first used with (file `database`, password left out), so a command run
    without the URL cannot silently start an empty second set of records.
    """

    def __init__(self, state_dir: Path, db: HQDatabase, marker: str):
        self.dir, self.db, self.marker = Path(state_dir), db, marker
        self._ready = False

    def ensure(self) -> "HQState":
        """Create the directories and tables once (idempotent); then the directory is bound to
        this database."""
        if not self._ready:
            for sub in ("frames", "bundles"):
                (self.dir / sub).mkdir(parents=True, exist_ok=True)
            self.db.create_tables()
            if not (self.dir / DB_MARKER).exists():
                (self.dir / DB_MARKER).write_text(self.marker + "\n")
            self._ready = True
        return self

    def close(self) -> None:
        self.db.close()


def open_state(state: "HQState | Path | str", database_url: str | None = None) -> HQState:
    if isinstance(state, HQState):
        return state
    state_dir = Path(state)
    db = HQDatabase.from_url(database_url) if database_url else HQDatabase.sqlite(state_dir / "hq.db")
    wanted = redact(database_url) if database_url else DEFAULT_DB
    marker = state_dir / DB_MARKER
    recorded = marker.read_text().strip() if marker.is_file() else None
    if recorded is None and (state_dir / "hq.db").exists():
        recorded = DEFAULT_DB            # made before the marker existed: its records are in hq.db
    if recorded is not None and recorded != wanted:
        def say(url):
            return "SQLite (hq.db in the state directory)" if url == DEFAULT_DB else url
        raise HQError(f"{state_dir} keeps its records in {say(recorded)}, not {say(wanted)}: pass the same "
                      f"database (--database-url or LINEJUDGE_HQ_DATABASE_URL); if the database really "
                      f"moved, edit {marker}")
    return HQState(state_dir, db, wanted)


def init_state(state: "HQState | Path | str") -> HQState:
    """Open the state (SQLite by default) and create its directories and tables (idempotent)."""
    return open_state(state).ensure()


# ---------------------------------------------------------------- storage helpers

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def frame_path(state: "HQState | Path", sha256: str) -> Path:
    sha256 = sha256.lower()
    return (state.dir if isinstance(state, HQState) else Path(state)) / "frames" / sha256[:2] / sha256


# ---------------------------------------------------------------- CLI-friendly functions

def add_appliance(state: HQState | Path, appliance_id: str) -> str:
    """Register an appliance (or rotate its token); returns the token, shown only this once.

    The token is "<appliance_id>.<secret>", so the appliance knows its own id from its token
    file; HQ keeps only its sha256. Adding an existing id replaces its token.
    """
    if not NAME_RE.match(appliance_id or ""):
        raise HQError(f"appliance id {appliance_id!r} is not valid: use 1-64 letters, digits, '.', '_' "
                      "or '-', starting with a letter or digit")
    hq = init_state(state)
    token = f"{appliance_id}.{secrets.token_urlsafe(32)}"
    with hq.db.connect() as db, db.write():
        db.execute("INSERT INTO appliances (appliance_id, token_sha256, created) VALUES (?, ?, ?) "
                   "ON CONFLICT(appliance_id) DO UPDATE SET token_sha256 = excluded.token_sha256",
                   [appliance_id, _sha256(token), _now()])
    return token


def appliance_for_token(state: HQState | Path, token: str) -> str | None:
    with init_state(state).db.connect() as db:
        row = db.one("SELECT appliance_id FROM appliances WHERE token_sha256 = ?", [_sha256(token)])
    return row[0] if row else None


def latest_bundle(state: HQState | Path, line: str) -> int | None:
    with init_state(state).db.connect() as db:
        row = db.one("SELECT max(version) FROM bundles WHERE line = ?", [line])
    return row[0] if row and row[0] is not None else None


def publish_bundle(state: HQState | Path, bundle_dir: Path, key_files: list[Path] | None = None) -> Path:
    """Copy a signed bundle to state_dir/bundles/<line>/<version>/ and make it the line's latest.

    Only manifest.json, manifest.sig and the files the manifest lists are copied. Versions per
    line must increase; a published version is never replaced. With key_files the full
    signature verification runs first.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise HQError(f"{bundle_dir} is not a bundle directory; pass the directory 'linejudge export' wrote")
    hq = init_state(state)
    for name in lib.RESERVED:
        if not (bundle_dir / name).is_file():
            raise HQError(f"{bundle_dir} has no {name}: sign the bundle before publishing "
                          "('linejudge bundle sign')")
    raw = (bundle_dir / lib.MANIFEST).read_bytes()
    try:    # the bundle's own checks; the signature too when HQ holds the trust list
        manifest = lib.parse_manifest(raw)
        lib.check_files(bundle_dir, manifest["files"], allow_unlisted=True)
        if key_files:
            lib.verify_bundle(bundle_dir, lib.load_public_keys(key_files), line=manifest["line"])
    except lib.BundleError as exc:
        raise HQError(f"not publishing {bundle_dir}: {exc}") from None
    line, version = manifest.get("line"), manifest.get("version")
    if not isinstance(line, str) or not NAME_RE.match(line):
        raise HQError(f"manifest line {line!r} is not a valid line name")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise HQError(f"manifest version {version!r} is not a non-negative integer")
    latest = latest_bundle(hq, line)
    if latest is not None and version <= latest:
        raise HQError(f"line {line} already has version {latest}; bundle versions must increase, "
                      f"export this one as version {latest + 1} or higher")
    line_dir = hq.dir / "bundles" / line
    line_dir.mkdir(parents=True, exist_ok=True)
    dest = line_dir / str(version)
    if dest.exists():
        raise HQError(f"{dest} exists already; published bundles are never replaced")
    tmp = line_dir / f".publish-{version}-{secrets.token_hex(4)}"
    try:
        for rel in [*lib.RESERVED, *(e["path"] for e in manifest["files"])]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle_dir / rel, tmp / rel)
            with open(tmp / rel, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with hq.db.connect() as db, db.write():
        db.execute("INSERT INTO bundles (line, version, manifest_sha256, published_at) VALUES (?, ?, ?, ?)",
                   [line, version, _sha256(raw), _now()])
    return dest


def feedback_records(state: HQState | Path, kind: str | None = None, since_id: int = 0) -> list[dict]:
    """Stored feedback for retraining, oldest first: id, appliance_id, idempotency_key, kind,
    payload (dict), received_at and frame_file (the uploaded frame's path, or None).
    `since_id` is for a quiet HQ: on PostgreSQL, concurrent writers can make ids visible out of
    order, so paging a live HQ by id may skip rows; read everything (as retrain does) instead."""
    if not isinstance(state, HQState) and not (Path(state) / "hq.db").exists() \
            and not (Path(state) / DB_MARKER).exists():
        return []                           # nothing there yet; do not create an HQ by reading
    hq = init_state(state)
    sql = "SELECT * FROM feedback WHERE id > ?" + (" AND kind = ?" if kind else "") + " ORDER BY id"
    with hq.db.connect() as db:
        rows = db.query(sql, [since_id, kind] if kind else [since_id])
    out = []
    for row in rows:
        payload = json.loads(row["payload"])
        sha = payload.get("frame_sha256") if isinstance(payload, dict) else None
        frame = frame_path(hq, sha) if isinstance(sha, str) and SHA256_RE.match(sha) else None
        out.append({**row, "payload": payload, "frame_file": str(frame) if frame and frame.is_file() else None})
    return out


def fleet(state: HQState | Path) -> list[dict]:
    with init_state(state).db.connect() as db:
        rows = list(db.query("SELECT appliance_id, created, last_seen, model_version, flag_rate, backlog, "
                             "inspections, last_install, last_status FROM appliances ORDER BY appliance_id"))
    for row in rows:
        row["last_install"] = json.loads(row["last_install"]) if row["last_install"] else None
        status = json.loads(row.pop("last_status") or "{}")
        # Which boxes disagree with their golden set, and on what CPU: as the appliance reported.
        row.update(precision=status.get("precision"), golden=status.get("golden"), platform=status.get("platform"))
    return rows


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
    digest = _sha256(body)
    with hq.db.connect() as db, db.write(lock=f"feedback:{appliance_id}"):
        seen = db.one("SELECT body_sha256, response FROM batches WHERE appliance_id = ? AND batch_key = ?",
                      [appliance_id, batch_key])
        if seen:
            if seen[0] != digest:
                _bad(409, f"Idempotency-Key {batch_key!r} was used before for a different batch; "
                          "use a new key for new content")
            return {**json.loads(seen[1]), "replayed": True}
        now = _now()
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
    now = _now()
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
    state_dir = hq.dir
    app = FastAPI(title="linejudge HQ", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hq = hq

    def authenticate(request: Request) -> str:
        appliance = appliance_for_token(hq, _bearer(request))
        if appliance is None:
            _bad(401, "unknown token: register the appliance with 'linejudge hq add-appliance' and "
                      "put the token in its hq_token_file", {"WWW-Authenticate": "Bearer"})
        return appliance

    def authorize(request: Request, appliance_id: str) -> str:
        who = authenticate(request)
        if not hmac.compare_digest(who.encode(), appliance_id.encode()):
            _bad(403, f"this token belongs to appliance {who!r}, not {appliance_id!r}")
        return who

    def check_line(line: str) -> None:
        if not NAME_RE.match(line):
            _bad(400, f"invalid line name {line!r}")

    @app.exception_handler(HTTPException)
    async def _http_error(_, exc: HTTPException):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/healthz")
    def healthz():
        return {"ok": True}

    @app.get("/v1/whoami")
    def whoami(request: Request):
        return {"appliance_id": authenticate(request)}

    @app.post("/v1/appliances/{appliance_id}/feedback")
    async def feedback(appliance_id: str, request: Request):
        await run_in_threadpool(authorize, request, appliance_id)
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

    def _frame_target(sha256: str) -> Path:
        if not SHA256_RE.match(sha256):
            _bad(400, "a frame is addressed by its sha256: 64 hex characters")
        return frame_path(state_dir, sha256)

    @app.head("/v1/frames/{sha256}")
    def frame_exists(sha256: str, request: Request):
        authenticate(request)
        return Response(status_code=200 if _frame_target(sha256).is_file() else 404)

    @app.put("/v1/frames/{sha256}")
    async def put_frame(sha256: str, request: Request):
        await run_in_threadpool(authenticate, request)
        target = _frame_target(sha256)
        body = await _read_body(request, MAX_FRAME_BYTES)
        actual = _sha256(body)
        if actual != sha256.lower():
            _bad(400, f"body sha256 is {actual}, not the {sha256} in the path; the upload was corrupted")
        if target.is_file():
            return JSONResponse({"sha256": actual, "stored": False}, status_code=200)
        await run_in_threadpool(lib.write_file_atomic, target, body)
        return JSONResponse({"sha256": actual, "stored": True}, status_code=201)

    @app.get("/v1/lines/{line}/manifest")
    def manifest(line: str, request: Request):
        authenticate(request)
        check_line(line)
        version = latest_bundle(hq, line)
        path = state_dir / "bundles" / line / str(version) / lib.MANIFEST
        if version is None or not path.is_file():
            _bad(404, f"no bundle published for line {line!r}")
        return Response(path.read_bytes(), media_type="application/json",
                        headers={"X-Bundle-Version": str(version), "Cache-Control": "no-cache"})

    @app.api_route("/v1/lines/{line}/bundles/{version}/{path:path}", methods=["GET", "HEAD"])
    def bundle_file(line: str, version: str, path: str, request: Request):
        authenticate(request)
        check_line(line)
        if not version.isdigit() or not version.isascii():
            _bad(400, f"bundle version must be an integer, not {version!r}")
        if unsafe_path(path):
            _bad(400, f"invalid bundle file path {path!r}")
        root = (state_dir / "bundles" / line / str(int(version))).resolve()
        target = root / path
        try:
            inside = target.resolve(strict=True).relative_to(root) == Path(path)
        except (OSError, ValueError):
            inside = False
        if not inside or not target.is_file():
            _bad(404, f"{path} is not a file of bundle {line} v{int(version)}")
        return FileResponse(target, media_type="application/octet-stream",
                            headers={"Cache-Control": "no-cache"})

    @app.post("/v1/appliances/{appliance_id}/status")
    async def status(appliance_id: str, request: Request):
        await run_in_threadpool(authorize, request, appliance_id)
        _, data = await _read_json(request, MAX_STATUS_BYTES)
        if not isinstance(data, dict):
            _bad(400, "status must be a JSON object")
        await run_in_threadpool(_store_status, hq, appliance_id, data)
        return {"ok": True, "server_time": _now()}

    @app.get("/v1/fleet")
    def fleet_view(request: Request):
        token = _bearer(request)
        if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
            with hq.db.connect() as db:
                lines = {r["line"]: r["version"] for r in
                         db.query("SELECT line, max(version) AS version FROM bundles GROUP BY line")}
            return {"appliances": fleet(hq), "latest_bundles": lines}
        if appliance_for_token(hq, token) is not None:
            _bad(403, "the fleet view needs the HQ admin token, not an appliance token")
        if not admin_token:
            _bad(403, "the fleet view is disabled: start HQ with an admin token (--admin-token)")
        _bad(401, "unknown token", {"WWW-Authenticate": "Bearer"})

    return app
