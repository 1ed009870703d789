"""Alarms in words an operator can act on, and the screen's rules that need no browser."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from appliance import alarms, ui
from appliance.store import Store
from models.errors import StoreError

RANKING = [("crack", 2.0), ("no defect", -1.0)]


def grabber(captured=0, last_frame_at=None, error=None):
    return SimpleNamespace(captured=captured, last_frame_at=last_frame_at, error=error)


def test_no_camera_and_camera_lost_are_told_apart_and_wait_a_few_frames():
    assert alarms.camera_alarm(grabber(), started_at=100.0, max_fps=10, now=103.0) is None
    none = alarms.camera_alarm(grabber(error=OSError("no /dev/video0")), 100.0, 10, 106.0)
    assert none.text.startswith("No camera: no picture has come in 6 s (no /dev/video0)")
    assert alarms.camera_alarm(grabber(5, last_frame_at=200.0), 100.0, 10, 204.0) is None
    lost = alarms.camera_alarm(grabber(5, last_frame_at=200.0), 100.0, 10, 330.0)
    assert lost.kind == "camera" and lost.text.startswith("Camera lost: no picture for 2 min.")
    assert alarms.camera_alarm(grabber(5, last_frame_at=200.0), 100.0, 0.5, 208.0) is None  # 5 frames at 0.5 fps


def test_disk_sync_and_model_alarms():
    assert alarms.disk_alarm(None, 5000) is None
    assert "150 MB free" in alarms.disk_alarm(None, 150).text
    assert alarms.disk_alarm("disk full: frames are not being saved", 0).text.startswith("Disk problem: disk full")
    assert alarms.sync_alarm(None, 300, None, 0.0, 1e6) is None                 # no HQ configured
    assert alarms.sync_alarm("http://hq", 300, 1000.0, 0.0, 1000.0 + 900) is None
    stalled = alarms.sync_alarm("http://hq", 300, 1000.0, 0.0, 1000.0 + 3600)
    assert stalled.text.startswith("No contact with HQ for 60 min")
    assert alarms.model_alarm(SimpleNamespace(fallback=False)) is None
    assert alarms.model_alarm(SimpleNamespace(fallback=True)).text.startswith("Backup model in use")


def test_flag_reasons_reach_the_operator_in_plain_words():
    assert ui.plain_reason("low confidence: best beats runner-up with p=0.55 (threshold 0.80)") == \
        "the model is unsure between two explanations"
    assert ui.plain_reason("possible defect: 35% chance of a defect behind a defect-free verdict "
                           "(threshold 11%)") == "the model says OK but sees a real chance of a defect"
    assert ui.plain_reason("no part in view: the picture is all dark") == "no part in view: the picture is all dark"
    assert ui.part_state(True, False) == "review" and ui.part_state(False, True) == "ng"
    assert ui.part_state(False, False) == "ok" and ui.part_state(False, None) == "ok"


def test_a_session_ends_after_the_idle_time_and_says_so():
    appliance = SimpleNamespace(cfg=SimpleNamespace(operator_idle_logout_s=600))
    fresh = {"name": "ana", "seen": time.monotonic()}
    assert ui.check_session(appliance, fresh)[0] == fresh
    session, message, login_row, panel, *_ = ui.check_session(appliance, {"name": "ana", "seen": time.monotonic() - 601})
    assert session is None and message.startswith("Logged out after 10 min without a tap")
    assert panel["visible"] is False and login_row["visible"] is True


def test_undo_takes_back_the_review_and_its_records_until_they_have_gone_to_hq(tmp_path):
    with Store(tmp_path / "a.db") as store:
        iid = store.log_inspection(line="l", station="s", model_version=1, verdict="crack", best_score=2.0,
                                   p_best=0.5, flagged=True, reasons=[], ranking=RANKING, latency_ms=1.0)
        first = store.add_review(iid, "ana", "no defect")
        assert store.undo_review(first) == iid
        assert store.reviews_of(iid) == [] and store.unsent_outbox() == []
        assert [r["id"] for r in store.review_queue()] == [iid]             # waiting again
        second = store.add_review(iid, "ana", "crack")
        store.mark_sent([r["id"] for r in store.unsent_outbox()])
        with pytest.raises(StoreError, match="already gone to HQ and cannot be undone"):
            store.undo_review(second)
        with pytest.raises(StoreError, match="does not exist"):
            store.undo_review(second + 100)


def test_an_undo_and_a_sync_pass_never_both_win(tmp_path):
    """Once sync has counted its attempt the review may be at HQ: Undo is refused; rows an Undo
    took back first are not sent (record_attempt returns only the rows still there)."""
    with Store(tmp_path / "a.db") as store:
        first, second = (store.log_inspection(line="l", station="s", model_version=1, verdict="crack",
                                              best_score=2.0, p_best=0.5, flagged=True, reasons=[],
                                              ranking=RANKING, latency_ms=1.0) for _ in range(2))
        undone = store.add_review(first, "ana", "no defect")
        store.add_review(second, "ana", "crack")
        ids = [r["id"] for r in store.unsent_outbox()]          # sync has read the rows ...
        store.undo_review(undone)                              # ... an Undo comes first ...
        present = store.record_attempt(ids)                    # ... so they are not sent
        assert {r["inspection_id"] for r in store._query("SELECT inspection_id FROM outbox WHERE id IN "
                                                         f"({','.join(map(str, present))})")} == {second}
        with pytest.raises(StoreError, match="already gone to HQ"):
            store.undo_review(store.reviews_of(second)[0]["id"])
