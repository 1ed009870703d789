"""HQ's state: one directory and the database of its records; appliances and their tokens.

State lives under one directory: frames/ab/<sha256>, bundles/<line>/<version>/ (published,
signed bundles; never modified once published: training/hq/publish.py) and the records
(appliances, feedback, batches, bundles, installs) in hq.db (SQLite, WAL) or, for fleet scale,
in PostgreSQL given by a database URL (training/hq/db.py). Appliance tokens are random, shown
once by add_appliance, and stored only as sha256. Every write is one transaction that locks what
it reads first.

The appliances write their feedback and status through the server (training/hq/server.py);
feedback_records and fleet read them back for retraining and the operator.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
from pathlib import Path

from models.common import to_iso
from models.errors import LinejudgeError
from training.hq.db import HQDatabase, redact

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")     # appliance ids and line names
SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")

DB_MARKER = "database"            # in the state dir: which database holds its records
DEFAULT_DB = "sqlite:hq.db"


class HQError(LinejudgeError):
    """An HQ operation (publishing, adding an appliance) cannot be done as asked."""


# ---------------------------------------------------------------- files + database

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


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def frame_path(state: "HQState | Path", sha256: str) -> Path:
    sha256 = sha256.lower()
    return (state.dir if isinstance(state, HQState) else Path(state)) / "frames" / sha256[:2] / sha256


# ---------------------------------------------------------------- appliances and tokens

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
                   [appliance_id, sha256_hex(token), to_iso()])
    return token


def appliance_for_token(state: HQState | Path, token: str) -> str | None:
    with init_state(state).db.connect() as db:
        row = db.one("SELECT appliance_id FROM appliances WHERE token_sha256 = ?", [sha256_hex(token)])
    return row[0] if row else None


# ---------------------------------------------------------------- the records, read back

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
