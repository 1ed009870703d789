import errno
import hashlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlite_utils

from appliance import store as store_mod
from models.errors import StoreError
from appliance.store import DISK_FULL_ALARM, Store, apply_migrations
from models.common import to_iso, utc

ROOT = Path(__file__).resolve().parents[2]
RANKING = [("crack in the upper left cell", 2.0), ("finger interruption", 1.0), ("no defect", -1.0)]
LATER = datetime.now(timezone.utc) + timedelta(days=60)


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "appliance.db", frames_dir=tmp_path / "frames")
    yield s
    s.close()


def log(store, n=0, flagged=False, frame=True, verdict=None):
    return store.log_inspection(
        line="el-solar", station="s1", model_version="v1", verdict=verdict or RANKING[0][0],
        best_score=2.0, p_best=0.73, flagged=flagged, reasons=["low confidence"] if flagged else [],
        ranking=RANKING, latency_ms=12.5, frame_png=f"frame-{n}".encode() * 100 if frame else None)


def count(store, table):
    return store._query(f"SELECT count(*) AS n FROM {table}")[0]["n"]


def test_migrations_are_idempotent_on_reopen(tmp_path):
    path = tmp_path / "appliance.db"
    with Store(path) as first:
        iid = log(first)
        assert first.execute_write_fn(lambda db: db.execute("PRAGMA synchronous").fetchone()[0]).result() == 2
    with Store(path) as again:
        numbers = [r["number"] for r in again._query("SELECT number FROM schema_migrations ORDER BY number")]
        assert numbers == [m[0] for m in store_mod.MIGRATIONS]
        assert again.inspection(iid) is not None
    db = sqlite_utils.Database(path)
    assert apply_migrations(db) == []
    assert db.journal_mode == "wal"
    db.close()


def test_log_and_read_back(store):
    iid = log(store, flagged=True)
    got = store.inspection(iid)
    assert got["verdict"] == RANKING[0][0] and got["flagged"] is True
    assert got["flag_reasons"] == ["low confidence"] and got["latency_ms"] == 12.5
    assert [(s["text"], s["score"], s["rank"]) for s in got["scores"]] == [(t, s, i + 1) for i, (t, s) in
                                                                          enumerate(RANKING)]
    data = b"frame-0" * 100
    sha = hashlib.sha256(data).hexdigest()
    assert got["frame_sha256"] == sha and got["frame_path"] == f"{sha[:2]}/{sha}.png"
    assert Path(got["frame_file"]).read_bytes() == data
    log(store, 1, verdict="No defect")
    assert [r["verdict"] for r in store.history(verdict_contains="no def")] == ["No defect"]
    assert [r["id"] for r in store.history(verdict_contains="CRACK")] == [iid]      # part of it, any case
    assert [r["id"] for r in store.history(flagged=True)] == [iid]
    assert len(store.history(since=got["ts"])) == 2 and store.history(since="2999-01-01") == []
    assert store.inspection(12345) is None
    stats = store.stats()
    assert stats.pop("review_budget")["offered_last_hour"] == 1
    assert stats == {"inspections": 2, "flagged": 1, "reviewed": 0, "review_queue": 1,
                     "outbox_unsent": 0, "flag_rate": 0.5}


def test_review_writes_review_and_preference_outbox(store):
    iid = log(store, flagged=True)
    rid = store.add_review(iid, "ann", "finger interruption", note="clearly a finger")
    rows = store.unsent_outbox()
    assert [r["kind"] for r in rows] == ["review", "preference", "preference"]
    assert [r["idempotency_key"] for r in rows] == [f"review-{iid}-{rid}", f"pref-{iid}-{rid}-0",
                                                     f"pref-{iid}-{rid}-1"]
    prefs = [r["payload"] for r in rows[1:]]
    assert {p["rejected"] for p in prefs} == {"crack in the upper left cell", "no defect"}
    assert all(p["chosen"] == "finger interruption" and p["model_version"] == "v1" and p["inspection_id"] == iid
               and p["frame_sha256"] == store.inspection(iid)["frame_sha256"] for p in prefs)
    store.record_attempt([rows[0]["id"]])
    store.mark_sent([rows[0]["id"]])
    assert [r["id"] for r in store.unsent_outbox()] == [r["id"] for r in rows[1:]]
    assert store._query("SELECT attempts FROM outbox WHERE id = ?", [rows[0]["id"]])[0]["attempts"] == 1
    assert store.stats()["reviewed"] == 1 and store.stats()["outbox_unsent"] == 2
    with pytest.raises(StoreError, match="does not exist"):
        store.add_review(999, "ann", "no defect")


def test_review_and_outbox_commit_together_or_not_at_all(store, monkeypatch):
    iid = log(store, flagged=True)
    # an outbox row already holds the key the second outbox insert will use: it fails mid-transaction
    store.execute_write_fn(lambda db: db.execute(
        "INSERT INTO outbox (kind, payload, idempotency_key, created) VALUES ('x', '{}', ?, 'now')",
        [f"pref-{iid}-1-0"])).result()
    with pytest.raises(StoreError):
        store.add_review(iid, "ann", "no defect")
    assert count(store, "reviews") == 0 and count(store, "outbox") == 1

    def broken(*args):
        yield "review", "k1", {}
        raise RuntimeError("power cut")
    monkeypatch.setattr(store_mod, "_review_outbox", broken)
    with pytest.raises(RuntimeError):
        store.add_review(iid, "ann", "no defect")
    assert count(store, "reviews") == 0 and count(store, "outbox") == 1
    assert [r["id"] for r in store.review_queue()] == [iid]


def test_review_queue_is_newest_first_among_equally_sure_parts_and_skips_reviewed(store):
    """(appliance/review_budget.py: the most uncertain first, then the newest; the part still at
    the station before one that has long left it.)"""
    ids = [log(store, n, flagged=True) for n in range(4)]
    log(store, 9, flagged=False)
    assert [r["id"] for r in store.review_queue()] == ids[::-1]
    store.add_review(ids[1], "ann", "no defect")
    assert [r["id"] for r in store.review_queue()] == [ids[3], ids[2], ids[0]]
    assert [r["id"] for r in store.review_queue(limit=1)] == [ids[3]]
    assert store.stats()["review_queue"] == 3


def test_a_part_is_reviewed_once_and_never_with_an_empty_explanation(store):
    iid = log(store, flagged=True)
    store.add_review(iid, "ann", "finger interruption")
    with pytest.raises(StoreError, match="already reviewed by ann"):      # a second tablet, a double tap
        store.add_review(iid, "bob", "no defect")
    with pytest.raises(StoreError, match="empty"):
        store.add_review(log(store, 1, flagged=True), "ann", "   ")
    assert count(store, "reviews") == 1 and count(store, "outbox") == 3
    chosen = {r["payload"]["chosen"] for r in store.unsent_outbox() if r["kind"] == "preference"}
    assert chosen == {"finger interruption"}


def test_operators_left_out_of_the_config_lose_their_pin(store):
    store.set_operator_pin("alice", "4711")
    store.set_operator_pin("bob", "0815")
    store.keep_only_operators({"bob": "0815"})
    assert not store.check_operator_pin("alice", "4711") and store.check_operator_pin("bob", "0815")


def test_prune_never_deletes_frames_of_unsent_outbox(store):
    ids = [log(store, n) for n in range(3)]
    store.add_review(ids[0], "ann", "no defect")
    files = {i: Path(store.inspection(i)["frame_file"]) for i in ids}
    assert store.prune_frames(now=LATER) == 2
    assert files[ids[0]].exists() and not files[ids[1]].exists() and not files[ids[2]].exists()
    assert store.inspection(ids[1])["frame_path"] is None
    assert store.inspection(ids[0])["frame_path"] is not None
    store.mark_sent([r["id"] for r in store.unsent_outbox()])
    assert store.prune_frames(now=LATER) == 1 and not files[ids[0]].exists()


def test_a_prune_backlog_goes_in_batches(store):
    ids = [log(store, n) for n in range(5)]
    assert [store.prune_frames(now=LATER, max_files=2) for _ in range(4)] == [2, 2, 1, 0]
    assert all(store.inspection(i)["frame_path"] is None for i in ids)


def test_prune_keeps_the_disk_budget_oldest_first(tmp_path, monkeypatch):
    same_ms = datetime(2026, 1, 1, tzinfo=timezone.utc)     # a fast line logs several frames per ms
    monkeypatch.setattr(store_mod, "to_iso", lambda moment=None, **kw: to_iso(moment or same_ms, **kw))
    monkeypatch.setattr(store_mod, "utc", lambda moment=None: utc(moment or same_ms))     # prune's now
    frame_bytes = len(b"frame-0" * 100)
    with Store(tmp_path / "a.db", frame_budget_mb=2.5 * frame_bytes / 2 ** 20) as s:
        ids = [log(s, n) for n in range(5)]
        s.add_review(ids[0], "ann", "no defect")        # unsent outbox: kept although oldest
        assert s.prune_frames() == 3
        kept = [i for i in ids if s.inspection(i)["frame_path"]]
        assert kept == [ids[0], ids[4]]
        assert all(Path(s.inspection(i)["frame_file"]).exists() for i in kept)


def test_prune_removes_old_orphan_files(store):
    orphan = store.frames_dir / "ff" / "ff00.png"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left behind by a crash")
    assert store.prune_frames() == 0                    # may belong to a write in flight
    assert store.prune_frames(now=LATER) == 1 and not orphan.exists()


def test_disk_full_keeps_logging_rows_and_raises_the_alarm(store, monkeypatch):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store_mod, "write_file_atomic", full)
    ids = [log(store, n) for n in range(3)]
    assert store.alarm == DISK_FULL_ALARM
    rows = [store.inspection(i) for i in ids]
    assert all(r["frame_path"] is None and r["frame_sha256"] for r in rows)
    monkeypatch.undo()
    iid = log(store, 7)
    assert store.alarm is None and Path(store.inspection(iid)["frame_file"]).exists()


def test_operator_pin_hashing_and_lockout(store):
    store.set_operator_pin("ann", "2468")
    row = store._query("SELECT * FROM operators")[0]
    assert "2468" not in json.dumps(row) and len(row["salt"]) == 32
    assert store.check_operator_pin("ann", "2468") is True
    assert store.check_operator_pin("bob", "2468") is False
    with pytest.raises(StoreError):
        store.set_operator_pin("ann", "12")
    clock = [1000.0]
    store.clock = lambda: clock[0]
    assert [store.check_operator_pin("ann", "0000") for _ in range(5)] == [False] * 5
    store.set_operator_pin("cid", "1357")
    with pytest.raises(StoreError) as locked:
        store.check_operator_pin("ann", "2468")
    assert str(locked.value) == "ann is locked for 5 more minutes after 5 wrong PINs; another operator can log in meanwhile"
    assert store.check_operator_pin("cid", "1357") is True          # a second operator is not locked out
    clock[0] += 250
    with pytest.raises(StoreError, match="ann is locked for 1 more minute after"):
        store.check_operator_pin("ann", "2468")
    clock[0] += 51
    assert store.check_operator_pin("ann", "2468") is True


def test_model_states(store):
    store.record_model(1, "active")
    store.record_model(2, "active")
    store.record_model(2, "rejected", "golden set failed")
    store.record_model(1, "active")
    states = {m["version"]: (m["state"], m["reason"]) for m in store.model_states()}
    assert states == {1: ("active", ""), 2: ("rejected", "golden set failed")}
    with pytest.raises(StoreError):
        store.record_model(3, "installed")


def test_concurrent_writers_all_commit(store):
    ids, errors = [], []

    def writer(t):
        try:
            for n in range(25):
                ids.append(log(store, t * 100 + n, flagged=n % 2 == 0))
        except Exception as exc:        # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(ids)) == 100
    assert count(store, "inspections") == 100 and count(store, "scores") == 300
    store.close()
    with pytest.raises(StoreError, match="closed"):
        log(store)


CHILD = """
import sys
sys.path.insert(0, sys.argv[3])
from pathlib import Path
from appliance.store import Store
store = Store(Path(sys.argv[1]), frames_dir=Path(sys.argv[2]))
print("ready", flush=True)
n = 0
while True:
    n += 1
    iid = store.log_inspection(line="l", station="s", model_version="v1", verdict="crack", best_score=1.0,
                               p_best=0.9, flagged=n % 3 == 0, reasons=[], ranking=[("crack", 1.0), ("ok", 0.2)],
                               latency_ms=1.0, frame_png=sys.argv[4].encode() + n.to_bytes(4, "big") * 256)
    if n % 4 == 0:
        store.add_review(iid, "ann", "ok")
    print(iid, flush=True)
"""


def test_sigkill_never_loses_a_committed_inspection(tmp_path):
    db, frames = tmp_path / "appliance.db", tmp_path / "frames"
    rng, printed = random.Random(20240611), []
    for round_ in range(5):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(frames), str(ROOT), f"r{round_}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready", child.stderr.read()
        printed.append(int(child.stdout.readline()))    # one commit first: a slow disk cannot make it empty
        time.sleep(rng.uniform(0.0, 0.45))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        lines = child.stdout.read().split("\n")[:-1]    # the last piece may be a half-written line
        child.stdout.close()
        child.stderr.close()
        printed += [int(x) for x in lines]
    with Store(db, frames_dir=frames) as s:
        found = {r["id"] for r in s._query("SELECT id FROM inspections")}
        assert set(printed) <= found
        assert s._query("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
        assert all((frames / r["frame_path"]).exists()
                   for r in s._query("SELECT frame_path FROM inspections WHERE frame_path IS NOT NULL"))
        assert count(s, "outbox") == 2 * count(s, "reviews")     # review + one preference pair


def test_only_frames_waiting_in_the_review_queue_are_spared_by_the_disk_budget(tmp_path):
    """Flagged parts the budget did not offer (or that left the queue) must not fill the disk."""
    from appliance.review_budget import ReviewPolicy
    frame_bytes = len(b"frame-0" * 100)
    with Store(tmp_path / "a.db", frame_budget_mb=1.5 * frame_bytes / 2 ** 20,
               review_policy=ReviewPolicy(cap_per_hour=1, burst=1)) as s:
        ids = [log(s, n, flagged=True) for n in range(4)]
        assert [s.inspection(i)["queued"] for i in ids] == [1, 0, 0, 0]
        assert s.prune_frames() == 3
        assert [i for i in ids if s.inspection(i)["frame_path"]] == [ids[0]]      # the one waiting
