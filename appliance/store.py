"""Appliance store: SQLite (WAL, synchronous=FULL) behind one writer thread.

Writes are callables queued to a thread that owns the only write connection (datasette
style); callers get a concurrent.futures.Future, and the blocking methods wait on it, so a
returned id is committed. Reads use one connection per calling thread. Frames are files
content-addressed by sha256 (frames_dir/ab/abcd....png; rows keep the relative path),
written before the row that names them. Frames of unsent outbox rows are never pruned.
Which frames go is appliance/frame_retention.py; operator PINs are appliance/operators.py.
Both reach the database only through this store, so every write stays on its writer thread.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
from concurrent.futures import Future
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Callable, Self

import sqlite_utils

from appliance.frame_retention import PRUNE_BATCH, delete_frames, forget_victims, scan_frames
from appliance.operators import OperatorPins
from appliance.review_budget import WAITING_SQL as WAITING, ReviewBudget, ReviewPolicy, clock_now
from models.errors import StoreError
from models.common import to_iso, utc, write_file_atomic

log = logging.getLogger(__name__)

DISK_FULL_ALARM = "disk full: frames are not being saved"
MODEL_STATES = ("active", "previous", "rejected")


def _create_tables(db: sqlite_utils.Database) -> None:
    db["inspections"].create({
        "id": int, "ts": str, "line": str, "station": str, "frame_path": str, "frame_sha256": str,
        "model_version": int, "verdict": str, "best_score": float, "p_best": float, "flagged": int,
        "flag_reasons": str, "latency_ms": float}, pk="id")
    to_inspection = [("inspection_id", "inspections", "id")]
    db["scores"].create({"inspection_id": int, "candidate": int, "text": str, "score": float, "rank": int},
                        pk=("inspection_id", "candidate"), foreign_keys=to_inspection)
    db["reviews"].create({"id": int, "inspection_id": int, "ts": str, "operator": str, "chosen_text": str,
                          "note": str}, pk="id", foreign_keys=to_inspection)
    db["outbox"].create({"id": int, "kind": str, "payload": str, "idempotency_key": str, "inspection_id": int,
                         "created": str, "sent_at": str, "attempts": int}, pk="id",
                        not_null={"kind", "payload", "idempotency_key"}, defaults={"attempts": 0})
    db["models"].create({"version": int, "installed_at": str, "state": str, "reason": str}, pk="version")
    db["operators"].create({"name": str, "pin_hash": str, "salt": str, "failed_attempts": int,
                            "locked_until": float}, pk="name", defaults={"failed_attempts": 0, "locked_until": 0.0})


# Append only: a shipped migration is never edited. Each runs in its own transaction.
MIGRATIONS: list[tuple[int, Callable[[sqlite_utils.Database], None] | str]] = [
    (1, _create_tables),
    (2, """CREATE UNIQUE INDEX outbox_idempotency_key ON outbox(idempotency_key);
           CREATE INDEX outbox_unsent ON outbox(sent_at, inspection_id);
           CREATE INDEX inspections_ts ON inspections(ts);
           CREATE INDEX inspections_flagged ON inspections(flagged, ts);
           CREATE INDEX inspections_frame ON inspections(frame_path);
           CREATE INDEX reviews_inspection ON reviews(inspection_id)"""),
    # where an inspection came from (camera, api), and whether it was offered for review
    # (appliance/review_budget.py); rows from before keep the old rule: every flagged one was
    (3, """ALTER TABLE inspections ADD COLUMN source TEXT NOT NULL DEFAULT 'camera';
           ALTER TABLE inspections ADD COLUMN queued INTEGER NOT NULL DEFAULT 0;
           UPDATE inspections SET queued = flagged,
                  source = CASE WHEN station LIKE '%:api' THEN 'api' ELSE 'camera' END;
           CREATE INDEX inspections_queued ON inspections(queued, ts)"""),
]

UNREVIEWED_SQL = ("SELECT * FROM inspections i WHERE queued = 1 AND ts < ? AND source IN (SELECT value FROM "
                  "json_each(?)) AND NOT EXISTS (SELECT 1 FROM reviews r WHERE r.inspection_id = i.id) "
                  "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.idempotency_key = 'unreviewed-' || i.id) "
                  "LIMIT 500")
INSERT_SCORE = "INSERT INTO scores (inspection_id, candidate, text, score, rank) VALUES (?, ?, ?, ?, ?)"


@contextmanager
def _immediate(db: sqlite_utils.Database):
    """One write transaction that takes the write lock at once (no deferred-upgrade deadlock)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.rollback()
        raise
    db.commit()


def apply_migrations(db: sqlite_utils.Database) -> list[int]:
    """Run the migrations this database has not seen yet; returns their numbers."""
    db.execute("CREATE TABLE IF NOT EXISTS schema_migrations (number INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    applied = []
    for number, step in sorted(MIGRATIONS, key=lambda m: m[0]):
        with _immediate(db):
            if db.execute("SELECT 1 FROM schema_migrations WHERE number = ?", [number]).fetchone():
                continue
            if callable(step):
                step(db)
            else:
                for sql in filter(str.strip, step.split(";")):
                    db.execute(sql)
            db.execute("INSERT INTO schema_migrations VALUES (?, ?)", [number, to_iso()])
            applied.append(number)
    return applied


def _score_rows(ranking: list[tuple[str, float]]) -> list[tuple]:
    """(candidate, text, score, rank) as INSERT_SCORE takes them after the inspection id:
    candidate = position in the given ranking; rank = 1 for the highest score."""
    order = sorted(range(len(ranking)), key=lambda i: -float(ranking[i][1]))
    rank_of = {i: r + 1 for r, i in enumerate(order)}
    return [(i, text, float(score), rank_of[i]) for i, (text, score) in enumerate(ranking)]


def _review_outbox(insp: dict, review_id: int, operator: str, chosen: str, note: str, texts: list[str]):
    """(kind, idempotency key, payload): the review, then one preference pair per rejected candidate."""
    iid = insp["id"]
    base = {"inspection_id": iid, "frame_sha256": insp["frame_sha256"], "model_version": insp["model_version"]}
    yield "review", f"review-{iid}-{review_id}", {**base, "review_id": review_id, "operator": operator,
                                                  "chosen": chosen, "note": note}
    for i, text in enumerate(t for t in dict.fromkeys(texts) if t != chosen):
        yield "preference", f"pref-{iid}-{review_id}-{i}", {**base, "chosen": chosen, "rejected": text}


def _refuse_second_review(db, inspection_id: int) -> None:
    earlier = list(db.query("SELECT operator, ts FROM reviews WHERE inspection_id = ? ORDER BY id LIMIT 1",
                            [inspection_id]))
    if earlier:
        raise StoreError(f"part #{inspection_id} was already reviewed by {earlier[0]['operator']} at "
                         f"{earlier[0]['ts'][11:19]} UTC; the first review stands, go on with the next part")


class SingleWriterDB:
    """The appliance database, migrated on open: one writer thread owns the only write
    connection and runs queued callables in order; reads use one connection per calling thread."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local, self._readers, self._lock = threading.local(), [], threading.Lock()
        self._closed, self._jobs = False, queue.Queue()
        ready: Future = Future()
        self._writer = threading.Thread(target=self._run_writer, args=(ready,), name="store-writer", daemon=True)
        self._writer.start()
        try:
            ready.result()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the appliance database {self.path}: {exc}; "
                             "check the disk and the state directory") from exc

    def _connect(self, *, reader: bool) -> sqlite_utils.Database:
        db = sqlite_utils.Database(sqlite3.connect(str(self.path), timeout=30, check_same_thread=not reader))
        if not reader:
            db.enable_wal()
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute(f"PRAGMA query_only={'ON' if reader else 'OFF'}")
        return db

    def _run_writer(self, ready: Future) -> None:
        """The writer thread: owns the write connection, runs queued callables in order."""
        try:
            db = self._connect(reader=False)
            apply_migrations(db)
        except BaseException as exc:
            return ready.set_exception(exc)
        ready.set_result(None)
        while (item := self._jobs.get()) is not None:
            fn, future = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(db))
                except BaseException as exc:
                    future.set_exception(exc)
        db.close()

    def execute_write_fn(self, fn: Callable[[sqlite_utils.Database], object]) -> Future:
        """Queue fn(db) for the writer thread; fn manages its own transaction."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise StoreError("the store is closed; open a new Store")
            self._jobs.put((fn, future))
        return future

    def _write(self, fn: Callable[[sqlite_utils.Database], object]):
        try:
            return self.execute_write_fn(fn).result()
        except sqlite3.Error as exc:
            raise StoreError(f"database write failed: {exc}") from exc

    def _execute(self, *statements: tuple[str, list]) -> None:
        """Run SQL statements in one write transaction and wait for the commit."""
        def run(db):
            with _immediate(db):
                for sql, params in statements:
                    db.execute(sql, params)
        self._write(run)

    def _reader(self) -> sqlite_utils.Database:
        """This thread's read connection."""
        if getattr(self._local, "db", None) is None:
            self._local.db = self._connect(reader=True)
            with self._lock:
                self._readers.append(self._local.db)
        return self._local.db

    def _query(self, sql: str, params=()) -> list[dict]:
        return list(self._reader().query(sql, params))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jobs.put(None)
        self._writer.join()
        for db in self._readers:
            db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Store(SingleWriterDB):
    """Inspections with their scores, reviews and the outbox to HQ, models, operators, and the
    saved frames the inspections name."""

    def __init__(self, path: Path, frames_dir: Path | None = None, frame_budget_mb: float = 500,
                 retention_days: float = 30, review_policy: ReviewPolicy = ReviewPolicy()):
        super().__init__(path)
        self.frames_dir = Path(frames_dir) if frames_dir else self.path.parent / "frames"
        self.frame_budget_bytes = int(frame_budget_mb * 1024 * 1024)
        self.retention = timedelta(days=retention_days)
        self.alarm: str | None = None
        self.clock = time.time                      # timestamps and PIN lockouts; tests replace it
        self.budget = ReviewBudget(review_policy)
        self.operators = OperatorPins(self._query, self._execute)

    def _save_frame(self, sha: str, data: bytes) -> str | None:
        """The frame's path relative to frames_dir, or None (and an alarm) if it cannot be saved."""
        rel = f"{sha[:2]}/{sha}.png"
        if (self.frames_dir / rel).exists():
            return rel
        try:
            write_file_atomic(self.frames_dir / rel, data)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            self.alarm = DISK_FULL_ALARM if full else f"frames are not being saved: {exc}"
            log.error("cannot save frame %s: %s", rel, exc)
            return None
        self.alarm = None
        return rel

    def log_inspection(self, *, line, station, model_version, verdict, best_score, p_best, flagged,
                       reasons: list[str], ranking: list[tuple[str, float]], latency_ms,
                       frame_png: bytes | None = None, source: str = "camera") -> int:
        """Save the frame, then commit the row and its scores (and whether it is offered for
        review: appliance/review_budget.py); returns the committed id."""
        sha = hashlib.sha256(frame_png).hexdigest() if frame_png is not None else None
        now = clock_now(self.clock)
        row = {"ts": to_iso(now), "line": line, "station": station, "source": source,
               "frame_path": self._save_frame(sha, frame_png) if sha else None, "frame_sha256": sha,
               "model_version": model_version, "verdict": verdict, "best_score": float(best_score),
               "p_best": float(p_best), "flagged": int(bool(flagged)), "flag_reasons": json.dumps(list(reasons)),
               "latency_ms": float(latency_ms)}
        scores = _score_rows(ranking)

        def insert(db):
            if row["frame_path"] and not (self.frames_dir / row["frame_path"]).exists():
                row["frame_path"] = self._save_frame(sha, frame_png)     # pruned meanwhile
            with _immediate(db):      # plain SQL on the hot path: half the CPU of Table.insert_all
                row["queued"] = int(self.budget.offer(db, now, source, bool(flagged)))
                iid = db.execute(f"INSERT INTO inspections ({', '.join(row)}) "
                                 f"VALUES ({', '.join('?' * len(row))})", list(row.values())).lastrowid
                db.conn.executemany(INSERT_SCORE, [(iid, *score) for score in scores])
            return iid
        return self._write(insert)

    def _inspection_dict(self, row: dict) -> dict:
        row["flagged"] = bool(row["flagged"])
        row["flag_reasons"] = json.loads(row["flag_reasons"] or "[]")
        row["frame_file"] = str(self.frames_dir / row["frame_path"]) if row["frame_path"] else None
        return row

    def inspection(self, id: int) -> dict | None:
        """The row with `scores` (best first), `reviews` and `frame_file` (absolute path or None)."""
        rows = self._query("SELECT * FROM inspections WHERE id = ?", [id])
        if not rows:
            return None
        found = self._inspection_dict(rows[0])
        found["scores"] = self._query("SELECT candidate, text, score, rank FROM scores "
                                      "WHERE inspection_id = ? ORDER BY rank", [id])
        found["reviews"] = self._query("SELECT * FROM reviews WHERE inspection_id = ? ORDER BY id", [id])
        return found

    def review_queue(self, limit: int = 50) -> list[dict]:
        """Inspections offered for review, not reviewed yet and younger than the policy's
        max_age_s: the most uncertain first (lowest p_best), then the newest."""
        rows = self._query(f"SELECT * FROM inspections i WHERE {WAITING} ORDER BY p_best, ts DESC, id DESC LIMIT ?",
                           [self.budget.fresh_since(clock_now(self.clock)), limit])
        return [self._inspection_dict(r) for r in rows]

    def history(self, verdict_contains: str | None = None, flagged: bool | None = None,
                since: str | None = None, limit: int = 100) -> list[dict]:
        """Newest first. `verdict_contains` matches part of the verdict, ignoring case; `since`
        is an ISO timestamp (UTC) compared with `ts`."""
        filters = [("instr(lower(verdict), lower(?)) > 0", verdict_contains),
                   ("flagged = ?", None if flagged is None else int(flagged)),
                   ("ts >= ?", since)]
        used = [(clause, value) for clause, value in filters if value is not None]
        where = ("WHERE " + " AND ".join(c for c, _ in used)) if used else ""
        rows = self._query(f"SELECT * FROM inspections {where} ORDER BY ts DESC, id DESC LIMIT ?",
                           [v for _, v in used] + [limit])
        return [self._inspection_dict(r) for r in rows]

    def add_review(self, inspection_id: int, operator: str, chosen_text: str, note: str = "") -> int:
        """The review row and its outbox rows (review + preference pairs) in one transaction.
        One review a part: a second one (another tablet, a double tap) is refused, so HQ never
        gets two contradicting preferences for the same frame."""
        if not chosen_text.strip():
            raise StoreError("the chosen explanation is empty; tap one or type what is wrong with the part")

        def insert(db):
            with _immediate(db):
                found = list(db.query("SELECT id, frame_sha256, model_version, source FROM inspections WHERE id = ?",
                                      [inspection_id]))
                if not found:
                    raise StoreError(f"inspection {inspection_id} does not exist; pick one from the review queue")
                _refuse_second_review(db, inspection_id)
                texts = [r["text"] for r in db.query("SELECT text FROM scores WHERE inspection_id = ? "
                                                     "ORDER BY rank", [inspection_id])]
                to_hq = found[0]["source"] in self.budget.policy.hq_sources
                now = to_iso(clock_now(self.clock))
                review_id = db["reviews"].insert({"inspection_id": inspection_id, "ts": now, "operator": operator,
                                                  "chosen_text": chosen_text, "note": note}).last_pk
                outbox = _review_outbox(found[0], review_id, operator, chosen_text, note, texts) if to_hq else ()
                for kind, key, payload in outbox:
                    db["outbox"].insert({"kind": kind, "payload": json.dumps(payload), "idempotency_key": key,
                                         "inspection_id": inspection_id, "created": now, "attempts": 0})
            return review_id
        return self._write(insert)

    def reviews_of(self, inspection_id: int) -> list[dict]:
        return self._query("SELECT * FROM reviews WHERE inspection_id = ? ORDER BY id", [inspection_id])

    def undo_review(self, review_id: int) -> int:
        """Take back a review and its outbox rows (the screen's Undo, within seconds): the part is
        waiting again. Refused once any of its records has gone to HQ. Returns the inspection id."""
        def delete(db):
            with _immediate(db):
                found = list(db.query("SELECT inspection_id FROM reviews WHERE id = ?", [review_id]))
                if not found:
                    raise StoreError(f"review {review_id} does not exist (already undone?)")
                iid = found[0]["inspection_id"]
                keys = [f"review-{iid}-{review_id}", f"pref-{iid}-{review_id}-%"]
                sent = db.execute("SELECT count(*) FROM outbox WHERE (idempotency_key = ? OR idempotency_key "
                                  "LIKE ?) AND (sent_at IS NOT NULL OR attempts > 0)", keys).fetchone()[0]
                if sent:
                    raise StoreError(f"the review of part #{iid} has already gone to HQ and cannot be undone; "
                                     "tell the engineer if it was wrong")
                db.execute("DELETE FROM outbox WHERE idempotency_key = ? OR idempotency_key LIKE ?", keys)
                db.execute("DELETE FROM reviews WHERE id = ?", [review_id])
            return iid
        return self._write(delete)

    def unsent_outbox(self, limit: int = 100) -> list[dict]:
        """Oldest first, with `payload` decoded."""
        rows = self._query("SELECT * FROM outbox WHERE sent_at IS NULL ORDER BY id LIMIT ?", [limit])
        return [{**r, "payload": json.loads(r["payload"])} for r in rows]

    def mark_sent(self, ids: list[int]) -> None:
        self._execute(("UPDATE outbox SET sent_at = ? WHERE sent_at IS NULL AND id IN "
                       "(SELECT value FROM json_each(?))", [to_iso(), json.dumps(list(ids))]))

    def record_attempt(self, ids: list[int]) -> list[int]:
        """Count a send attempt for these rows (before they go out); returns the ids still there
        (an Undo may have taken some back), which are then the only ones to send. Once counted,
        a review can no longer be undone: its records may be at HQ."""
        def count(db):
            with _immediate(db):
                db.execute("UPDATE outbox SET attempts = attempts + 1 WHERE id IN (SELECT value FROM json_each(?))",
                           [json.dumps(list(ids))])
                return [r["id"] for r in db.query("SELECT id FROM outbox WHERE id IN (SELECT value FROM json_each(?))",
                                                  [json.dumps(list(ids))])]
        return self._write(count)

    def record_model(self, version: str, state: str, reason: str = "") -> None:
        """One row per version; recording one as active demotes the active one to previous."""
        if state not in MODEL_STATES:
            raise StoreError(f"model state must be one of {', '.join(MODEL_STATES)}, not {state!r}")
        self._execute(("UPDATE models SET state = 'previous' WHERE state = 'active' AND version != ? "
                       "AND ? = 'active'", [version, state]),
                      ("INSERT INTO models (version, installed_at, state, reason) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT(version) DO UPDATE SET state = excluded.state, reason = excluded.reason",
                       [version, to_iso(), state, reason]))

    def model_states(self) -> list[dict]:
        return self._query("SELECT * FROM models ORDER BY installed_at DESC, rowid DESC")

    def stats(self) -> dict:
        now = clock_now(self.clock)
        counts = self._query(
            "SELECT (SELECT count(*) FROM inspections) AS inspections, "
            "(SELECT count(*) FROM inspections WHERE flagged = 1) AS flagged, "
            "(SELECT count(DISTINCT inspection_id) FROM reviews) AS reviewed, "
            f"(SELECT count(*) FROM inspections i WHERE {WAITING}) AS review_queue, "
            "(SELECT count(*) FROM outbox WHERE sent_at IS NULL) AS outbox_unsent",
            [self.budget.fresh_since(now)])[0]
        counts["flag_rate"] = counts["flagged"] / counts["inspections"] if counts["inspections"] else 0.0
        counts["review_budget"] = self.budget.used(self._reader(), now)
        return counts

    def send_unreviewed(self) -> int:
        """Where the plant opts in (send_unreviewed_to_hq): an "unreviewed" outbox record for
        each offered part that left the queue without a review (once each); returns how many."""
        if not self.budget.policy.send_unreviewed_to_hq or self.budget.policy.max_age_s is None:
            return 0
        now = clock_now(self.clock)

        def insert(db):
            with _immediate(db):
                rows = list(db.query(UNREVIEWED_SQL, [self.budget.fresh_since(now),
                                                      json.dumps(list(self.budget.policy.hq_sources))]))
                for r in rows:
                    payload = {"inspection_id": r["id"], "frame_sha256": r["frame_sha256"],
                               "model_version": r["model_version"], "verdict": r["verdict"], "p_best": r["p_best"],
                               "flag_reasons": json.loads(r["flag_reasons"] or "[]")}
                    db.execute("INSERT OR IGNORE INTO outbox (kind, payload, idempotency_key, inspection_id, "
                               "created, attempts) VALUES ('unreviewed', ?, ?, ?, ?, 0)",
                               [json.dumps(payload), f"unreviewed-{r['id']}", r["id"], to_iso(now)])
            return len(rows)
        return self._write(insert)

    def prune_frames(self, now: datetime | None = None, max_files: int = PRUNE_BATCH) -> int:
        """Delete frame files past retention or over the disk budget (oldest first), at most
        max_files in one write transaction so inspections never wait long behind it; returns how
        many (max_files means: call again, there may be more). The rules: frame_retention."""
        now = utc(now)
        on_disk = scan_frames(self.frames_dir)

        def prune(db):
            with _immediate(db):
                victims = forget_victims(db, now, on_disk, self.retention, self.frame_budget_bytes, max_files,
                                         self.budget.fresh_since(now))
            # after the commit, on the writer thread: no log_inspection races it
            delete_frames(self.frames_dir, victims)
            return len(victims)
        return self._write(prune)

    def set_operator_pin(self, name: str, pin: str) -> None:
        self.operators.set_pin(name, pin)

    def keep_only_operators(self, names) -> None:
        """Remove every operator not in `names`: taking someone out of the config revokes their PIN."""
        self.operators.keep_only(names)

    def check_operator_pin(self, name: str, pin: str) -> bool:
        """True if the PIN is right. After 5 failures the operator is locked for 5 minutes."""
        return self.operators.check(name, pin, now=self.clock())
