"""The review queue is a budget: capped, paced, fresh, and only for the sources the plant reviews."""
from __future__ import annotations

import random
import sqlite3
from datetime import datetime, timezone

import pytest

from appliance.config import config_from_dict
from appliance.review_budget import ReviewPolicy, policy_from_dict, shift_start
from appliance.store import MIGRATIONS, Store
from models.errors import ConfigError

RANKING = [("crack in the upper left cell", 2.0), ("no defect", -1.0)]
START = datetime(2026, 12, 4, 8, 0, tzinfo=timezone.utc).timestamp()


class Clock:
    def __init__(self, t: float = START):
        self.t = t

    def __call__(self) -> float:
        return self.t


def log(store, flagged=True, p_best=0.5, source="camera") -> int:
    return store.log_inspection(line="el-solar", station=f"s1:{source}", model_version=1, verdict="crack",
                                best_score=2.0, p_best=p_best, flagged=flagged, reasons=["unsure"],
                                ranking=RANKING, latency_ms=1.0, source=source)


def open_store(tmp_path, **policy) -> tuple[Store, Clock]:
    store = Store(tmp_path / "a.db", review_policy=ReviewPolicy(**policy))
    store.clock = Clock()
    return store, store.clock


def test_a_replayed_shift_at_5_fps_stays_within_the_cap_and_the_age(tmp_path):
    """20 minutes at 5 frames/s, about a third flagged, cap 60 an hour, parts leave after 120 s;
    an operator reviews the head of the queue every 40 s. The queue never holds more than the
    cap, no waiting part is ever older than 120 s, and the parts offered are paced through the
    shift instead of spent in its first minute."""
    store, clock = open_store(tmp_path, cap_per_hour=60, max_age_s=120)
    rng = random.Random(7)
    offered_at, longest_queue, oldest_wait = [], 0, 0.0
    with store:
        for frame in range(20 * 60 * 5):
            clock.t = START + frame / 5
            iid = log(store, flagged=rng.random() < 0.35, p_best=rng.random())
            if store.inspection(iid)["queued"]:
                offered_at.append(clock.t - START)
            if frame % 5 == 0:                                   # once a second, as the screen does
                queue = store.review_queue(limit=1000)
                longest_queue = max(longest_queue, len(queue))
                for row in queue:
                    age = clock.t - datetime.fromisoformat(row["ts"]).timestamp()
                    oldest_wait = max(oldest_wait, age)
            if frame % 200 == 0 and (head := store.review_queue(limit=1)):
                store.add_review(head[0]["id"], "alice", "no defect")
        budget = store.stats()["review_budget"]
    assert longest_queue <= 60 and oldest_wait <= 120
    assert budget["offered_last_hour"] == len(offered_at) <= 60
    # paced: at most 3 in any 3 minutes, and parts are still offered in the last minutes
    assert all(b - a >= 180 for a, b in zip(offered_at, offered_at[3:]))
    assert 15 <= len(offered_at) <= 25 and offered_at[-1] > 17 * 60


def test_the_most_uncertain_waiting_part_comes_first_then_the_newest(tmp_path):
    store, clock = open_store(tmp_path)
    with store:
        sure, unsure_old = log(store, p_best=0.9), log(store, p_best=0.2)
        clock.t += 1
        unsure_new = log(store, p_best=0.2)
        log(store, flagged=False, p_best=0.1)
        assert [r["id"] for r in store.review_queue()] == [unsure_new, unsure_old, sure]


def test_parts_past_the_age_leave_the_queue_but_stay_in_history(tmp_path):
    store, clock = open_store(tmp_path, max_age_s=60)
    with store:
        iid = log(store)
        clock.t += 59
        assert [r["id"] for r in store.review_queue()] == [iid] and store.stats()["review_queue"] == 1
        clock.t += 2
        assert store.review_queue() == [] and store.stats()["review_queue"] == 0
        assert [r["id"] for r in store.history()] == [iid]


def test_api_calls_are_not_offered_and_their_reviews_stay_on_the_appliance(tmp_path):
    store, _ = open_store(tmp_path)
    with store:
        api = log(store, source="api")
        assert store.review_queue() == [] and store.inspection(api)["source"] == "api"
        store.add_review(api, "alice", "no defect")                # e.g. through a stale screen
        assert store.unsent_outbox() == []
    store, _ = open_store(tmp_path / "b", sources=("camera", "api"), hq_sources=("camera", "api"))
    with store:
        api = log(store, source="api")
        assert [r["id"] for r in store.review_queue()] == [api]
        store.add_review(api, "alice", "no defect")
        assert {r["kind"] for r in store.unsent_outbox()} == {"review", "preference"}


def test_the_sampling_rate_offers_that_share_of_flagged_parts(tmp_path):
    store, _ = open_store(tmp_path, sample_rate=0.25)
    store.budget.rng = random.Random(3)
    with store:
        offered = sum(store.inspection(log(store))["queued"] for _ in range(400))
    assert 70 <= offered <= 130
    store, _ = open_store(tmp_path / "none", sample_rate=0.0)
    with store:
        log(store)
        assert store.review_queue() == []


def test_the_shift_cap_counts_from_the_local_shift_start(tmp_path):
    store, clock = open_store(tmp_path, cap_per_shift=2, shift_hours=8)
    with store:
        first = [store.inspection(log(store))["queued"] for _ in range(3)]
        clock.t = shift_start(datetime.fromtimestamp(START, timezone.utc), 8).timestamp() + 8 * 3600
        assert first == [1, 1, 0] and store.inspection(log(store))["queued"] == 1     # the next shift


def test_unreviewed_parts_go_to_hq_once_and_only_where_the_plant_opts_in(tmp_path):
    store, clock = open_store(tmp_path, max_age_s=30)
    with store:
        log(store)
        clock.t += 31
        assert store.send_unreviewed() == 0 and store.unsent_outbox() == []
    store, clock = open_store(tmp_path / "opt-in", max_age_s=30, send_unreviewed_to_hq=True)
    with store:
        iid, reviewed = log(store), log(store)
        store.add_review(reviewed, "alice", "no defect")
        clock.t += 31
        assert store.send_unreviewed() == 1 and store.send_unreviewed() == 0
        unreviewed = [r for r in store.unsent_outbox() if r["kind"] == "unreviewed"]
        assert [r["payload"]["inspection_id"] for r in unreviewed] == [iid]


def test_a_database_from_before_keeps_its_flagged_parts_in_the_queue(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    import sqlite_utils
    old = sqlite_utils.Database(db)
    MIGRATIONS[0][1](old)
    for sql in filter(str.strip, MIGRATIONS[1][1].split(";")):
        old.execute(sql)
    old.execute("CREATE TABLE schema_migrations (number INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
    old.execute("INSERT INTO schema_migrations VALUES (1, 'x'), (2, 'x')")
    for station, flagged in (("s1:camera", 1), ("s1:api", 1), ("s1:camera", 0)):
        old["inspections"].insert({"ts": "2026-12-01T00:00:00.000+00:00", "line": "el-solar", "station": station,
                                   "model_version": 1, "verdict": "v", "best_score": 1.0, "p_best": 0.5,
                                   "flagged": flagged, "flag_reasons": "[]", "latency_ms": 1.0})
    db.commit()
    db.close()
    with Store(path) as store:
        rows = {r["id"]: r for r in store.history()}
        assert [(rows[i]["source"], rows[i]["queued"]) for i in (1, 2, 3)] == [("camera", 1), ("api", 1), ("camera", 0)]
        assert [r["id"] for r in store.review_queue()] == [2, 1]


@pytest.mark.parametrize("review, words", [
    ({"cap_per_hour": 0}, "cap_per_hour must be a whole number of at least 1"),
    ({"sample_rate": 1.5}, "sample_rate must be a number from 0 to 1"),
    ({"max_age_s": -1}, "max_age_s must be a positive number"),
    ({"shift_hours": 7}, "shift_hours must divide the day"),
    ({"sources": ["plc"]}, "sources may hold camera and api"),
    ({"sources": "api"}, "sources must be a list"),
    ({"cap_hour": 60}, "unknown review key(s) cap_hour"),
    ([60], "review must be a mapping"),
])
def test_a_bad_review_setting_is_refused_with_what_to_write(review, words):
    with pytest.raises(ConfigError, match=None) as caught:
        config_from_dict({"review": review})
    assert words in str(caught.value)


def test_the_appliance_default_is_a_paced_fresh_queue_and_the_config_can_change_it():
    assert config_from_dict({}).review == ReviewPolicy(cap_per_hour=60, max_age_s=120)
    custom = config_from_dict({"review": {"cap_per_hour": 30, "sources": ["camera", "api"]}}).review
    assert custom.cap_per_hour == 30 and custom.sources == ("camera", "api") and custom.max_age_s == 120
    assert policy_from_dict({}) == ReviewPolicy()


def test_the_status_screen_says_how_much_of_the_budget_is_used(tmp_path):
    from appliance.ui import _budget_line
    store, _ = open_store(tmp_path, cap_per_hour=60, cap_per_shift=300, max_age_s=120)
    with store:
        log(store)
        line = _budget_line(store.stats()["review_budget"])
    assert line == ("**Review budget** parts offered in the last hour 1 of 60, this shift 1 of 300; "
                    "a part waits at most 120 s")
