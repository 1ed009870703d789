"""Saved-frame retention: which frame files under frames_dir go, and their removal.

A frame goes when it is past retention, when no inspection names it and it is older than
ORPHAN_GRACE_SECONDS (left by a crash between the file and its row), or, oldest first, while the
frames are over the disk budget. Frames of unsent outbox rows are kept always; frames awaiting
waiting in the review queue go only when expired. Store.prune_frames runs this on the store's writer thread: the rows
are cleared in one write transaction, then the files are deleted.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import datetime, timedelta
from pathlib import Path

import sqlite_utils

from appliance.review_budget import WAITING_SQL
from models.common import to_iso

log = logging.getLogger(__name__)

ORPHAN_GRACE_SECONDS = 300      # a frame file with no row yet may belong to a write in flight
PRUNE_BATCH = 500               # frame files deleted per write transaction

FRAME_REFS_SQL = """SELECT frame_path, max(ts) AS last_ts, max(id) AS last_id,
  max(EXISTS (SELECT 1 FROM outbox o WHERE o.inspection_id = i.id AND o.sent_at IS NULL)) AS keep,
  max(""" + WAITING_SQL + """) AS awaiting_review
FROM inspections i WHERE frame_path IS NOT NULL GROUP BY frame_path"""


def scan_frames(frames_dir: Path) -> dict[str, tuple[int, float]]:
    """{"ab/abcd....png": (size, mtime)} for every file under frames_dir/*/."""
    found = {}
    for sub in (os.scandir(frames_dir) if frames_dir.is_dir() else ()):
        for entry in (os.scandir(sub.path) if sub.is_dir() else ()):
            try:
                if entry.is_file():
                    st = entry.stat()
                    found[f"{sub.name}/{entry.name}"] = (st.st_size, st.st_mtime)
            except FileNotFoundError:
                continue
    return found


def choose_victims(now: datetime, on_disk: dict, refs: dict, retention: timedelta, budget_bytes: int) -> list[str]:
    """Expired or orphaned files, then the oldest until under budget. on_disk is scan_frames';
    refs maps a frame path to its FRAME_REFS_SQL row."""
    cutoff, grace = to_iso(now - retention), now.timestamp() - ORPHAN_GRACE_SECONDS
    total = sum(size for size, _ in on_disk.values())
    victims, by_age = [], []
    for rel, (size, mtime) in on_disk.items():
        ref = refs.get(rel)
        if ref is not None and ref["keep"]:
            continue
        if (ref is None and mtime < grace) or (ref is not None and ref["last_ts"] < cutoff):
            victims.append(rel)
            total -= size
        elif ref is not None and not ref["awaiting_review"]:
            by_age.append((ref["last_ts"], ref["last_id"], rel, size))   # id breaks ties in ts
    for *_, rel, size in sorted(by_age):
        if total <= budget_bytes:
            break
        victims.append(rel)
        total -= size
    return victims


def forget_victims(db: sqlite_utils.Database, now: datetime, on_disk: dict, retention: timedelta,
                   budget_bytes: int, max_files: int, fresh_since: str = "") -> list[str]:
    """Inside the caller's write transaction: choose at most max_files victims and clear the
    frame_path of the rows that name them; returns the victims, whose files the caller deletes
    (delete_frames) after the commit. A frame waits with its part in the review queue (offered,
    not reviewed, not older than fresh_since: ReviewBudget.fresh_since)."""
    refs = {r["frame_path"]: r for r in db.query(FRAME_REFS_SQL, [fresh_since])}
    victims = choose_victims(now, on_disk, refs, retention, budget_bytes)[:max_files]
    db.execute("UPDATE inspections SET frame_path = NULL WHERE frame_path IN "
               "(SELECT value FROM json_each(?))", [json.dumps(victims)])
    return victims


def delete_frames(frames_dir: Path, victims: list[str]) -> None:
    for rel in victims:
        (frames_dir / rel).unlink(missing_ok=True)
    if victims:
        log.info("pruned %d frame files", len(victims))
