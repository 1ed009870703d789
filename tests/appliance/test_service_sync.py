"""The running appliance syncs with HQ itself: a newer signed bundle is golden-checked, hot-swapped
while the inspection loop keeps going, committed after N healthy inspections or rolled back, and
the install result reaches HQ."""
from __future__ import annotations

import json
import shutil
import time
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.config import config_from_dict
from models.errors import ConfigError
from appliance import service
from appliance.service import STOP_JOIN_S, Appliance
from appliance.store import Store
from models import bundle as lib
from tests.helpers import BackgroundServer, wait_for
from training.hq import server as hq
from training.hq import publish as hq_publish, state as hq_state

APPLIANCE_ID = "a1"


# ---------------------------------------------------------------- bundles

def resign(bundle: Path, private_key: Path, version: int) -> Path:
    """Rewrite bundle's manifest (version, file hashes of its current files) and sign it."""
    manifest = json.loads((bundle / lib.MANIFEST).read_text())
    manifest["version"] = version
    manifest["files"] = [{"path": e["path"], "bytes": (bundle / e["path"]).stat().st_size,
                          "sha256": lib.file_sha256(bundle / e["path"])} for e in manifest["files"]]
    lib.write_manifest(bundle, manifest)
    lib.sign_bundle(bundle, private_key)
    return bundle


def next_version(tiny_bundle, out: Path, *, break_golden: bool = False) -> Path:
    """The tiny bundle as version 2, signed with the tiny bundle's key (the appliance trusts it).
    break_golden: the recorded golden rewards (INT8 and fp32) are shifted, so the golden-set
    check fails for both precisions while the signature is valid."""
    source, public, _ = tiny_bundle
    bundle = out / "el-solar-v2"
    shutil.copytree(source, bundle)
    if break_golden:
        expected_file = bundle / "golden" / "expected.json"
        expected = json.loads(expected_file.read_text())
        for row in expected:
            for key in ("rewards", "rewards_fp32"):
                row[key] = [r + 10.0 for r in row[key]]
        expected_file.write_text(json.dumps(expected))
    return resign(bundle, public.with_suffix(".key"), version=2)


@pytest.fixture(scope="module")
def v2(tiny_bundle, tmp_path_factory) -> Path:
    return next_version(tiny_bundle, tmp_path_factory.mktemp("v2"))


@pytest.fixture(scope="module")
def v2_bad_golden(tiny_bundle, tmp_path_factory) -> Path:
    return next_version(tiny_bundle, tmp_path_factory.mktemp("v2-bad"), break_golden=True)


# ---------------------------------------------------------------- HQ and the appliance

@pytest.fixture()
def hq_server(tmp_path):
    """HQ with appliance a1 registered; yields (state_dir, server, token_file)."""
    state = tmp_path / "hq"
    token_file = tmp_path / "hq-token"
    token_file.write_text(hq_state.add_appliance(state, APPLIANCE_ID) + "\n")
    with BackgroundServer(hq.create_hq_app(state, admin_token="admin")) as server:
        yield state, server, token_file


@pytest.fixture()
def make_appliance(tiny_bundle, hq_server, tmp_path):
    """make_appliance(**config) -> an Appliance on the tiny bundle (v1), syncing with HQ, not started."""
    bundle, public, _ = tiny_bundle
    _, server, token_file = hq_server
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        cv2.imwrite(str(frames / f"f{i}.png"), np.full((64, 64), 30 + 50 * i, np.uint8))
    made = []

    def make(**overrides) -> Appliance:
        cfg = {"state_dir": str(tmp_path / "state"), "bundle": str(bundle), "trusted_keys": [str(public)],
               "source": str(frames), "max_fps": 50, "save_frames": False, "hq_url": server.url,
               "hq_token_file": str(token_file), "sync_interval_s": 0.3, "commit_after_inspections": 5,
               "commit_timeout_s": 30, **overrides}
        made.append(Appliance(config_from_dict(cfg)))
        return made[-1]
    yield make
    for app in made:
        if not app.store._closed:
            app.stop()


def synced(app: Appliance, action: str):
    """The last sync result once its model phase ended with `action`."""
    return lambda: app.last_sync if app.last_sync and app.last_sync["model"]["action"] == action else None


def rows(app: Appliance, after: int = 0) -> list[dict]:
    return app.store._query("SELECT id, ts, model_version FROM inspections WHERE id > ? ORDER BY id", [after])


def inspected(app: Appliance) -> int:
    return app.store.stats()["inspections"]


def fleet_entry(state: Path) -> dict:
    return next(a for a in hq_state.fleet(state) if a["appliance_id"] == APPLIANCE_ID)


def current_version(app: Appliance) -> int | None:
    current = app.cfg.bundles_dir / "current"
    return json.loads((current / lib.MANIFEST).read_text())["version"] if current.exists() else None


# ---------------------------------------------------------------- tests

def test_new_bundle_is_hot_swapped_without_stopping_inspection(make_appliance, hq_server, v2):
    state, _, _ = hq_server
    app = make_appliance()
    app.start()
    wait_for(lambda: inspected(app) >= 3, what="v1 inspections")
    hq_publish.publish_bundle(state, v2)
    samples = []                                        # (monotonic time, inspections) while it swaps
    while not synced(app, "installed")():
        samples.append((time.monotonic(), inspected(app)))
        assert samples[-1][0] - samples[0][0] < 90, app.last_sync
        time.sleep(0.05)
    committed = inspected(app)
    wait_for(lambda: inspected(app) >= committed + 3, what="inspections after the commit")

    assert app.last_sync["ok"], app.last_sync
    assert app.runtime.version == 2 and current_version(app) == 2
    versions = [r["model_version"] for r in rows(app)]
    assert versions[0] == 1 and versions[-1] == 2
    assert versions == sorted(versions)                 # v1 judged up to the swap, v2 from then on
    assert versions.count(2) >= app.cfg.commit_after_inspections
    # the loop never paused: no gap between committed inspections, the count rose throughout
    stamps = [datetime.fromisoformat(r["ts"]).timestamp() for r in rows(app)]
    assert max(b - a for a, b in zip(stamps, stamps[1:])) < 5.0
    assert samples[-1][1] > samples[0][1]
    assert {m["version"]: m["state"] for m in app.store.model_states()} == {1: "previous", 2: "active"}
    entry = fleet_entry(state)
    assert entry["model_version"] == 2 and entry["last_install"]["state"] == "active"
    assert entry["last_install"]["version"] == 2


def test_bundle_failing_its_golden_check_is_rejected_and_v1_keeps_judging(make_appliance, hq_server,
                                                                          v2_bad_golden):
    state, _, _ = hq_server
    hq_publish.publish_bundle(state, v2_bad_golden)
    app = make_appliance()
    app.start()
    result = wait_for(synced(app, "rejected"), what="the rejection")
    assert "golden-set check failed" in result["model"]["reason"]
    seen = inspected(app)
    wait_for(lambda: inspected(app) > seen + 3, what="inspections after the rejection")
    assert app.runtime.version == 1 and current_version(app) is None
    assert {r["model_version"] for r in rows(app)} == {1}
    states = {m["version"]: m["state"] for m in app.store.model_states()}
    assert states == {1: "active", 2: "rejected"}
    entry = fleet_entry(state)
    assert entry["model_version"] == 1 and entry["last_install"]["state"] == "rejected"
    assert "golden-set" in entry["last_install"]["reason"]


def test_bundle_that_fails_in_inspection_is_rolled_back(make_appliance, hq_server, v2):
    state, _, _ = hq_server
    hq_publish.publish_bundle(state, v2)
    app = make_appliance()
    open_runtime = app._open_runtime

    def broken_runtime(bundle, manifest):          # passes the golden check, then cannot judge
        runtime = open_runtime(bundle, manifest)

        def judge(*args, **kwargs):
            raise RuntimeError("scorer produced garbage")
        runtime.judge = judge
        return runtime
    app._open_runtime = broken_runtime
    app.start()
    result = wait_for(synced(app, "rejected"), what="the rollback")
    assert result["model"]["reason"].startswith("rolled back to v1") and "garbage" in result["model"]["reason"]
    last = rows(app)[-1]["id"]
    wait_for(lambda: len(rows(app, last)) >= 3, what="inspections after the rollback")
    assert app.runtime.version == 1 and current_version(app) is None
    assert {r["model_version"] for r in rows(app)} == {1}       # v2 never committed a row
    assert {m["version"]: m["state"] for m in app.store.model_states()} == {1: "active", 2: "rejected"}
    entry = fleet_entry(state)
    assert entry["model_version"] == 1 and entry["last_install"]["state"] == "rejected"
    assert "rolled back" in entry["last_install"]["reason"]


class NoiseCamera:
    """A live camera whose every frame differs; `paused` stops it delivering frames."""
    name, live = "noise", True

    def __init__(self):
        self.rng, self.paused = np.random.default_rng(0), False

    def read(self):
        return None if self.paused else self.rng.integers(0, 255, (64, 64), np.uint8)

    def close(self):
        pass


def slowed(open_runtime, seconds: float):
    """_open_runtime whose models take `seconds` longer for every judgement."""
    def open_slow(bundle, manifest):
        runtime = open_runtime(bundle, manifest)
        judge = runtime.judge

        def slow_judge(*args, **kwargs):
            time.sleep(seconds)
            return judge(*args, **kwargs)
        runtime.judge = slow_judge
        return runtime
    return open_slow


def test_a_trial_on_an_idle_line_is_rolled_back_and_offered_again(make_appliance, hq_server, v2, monkeypatch):
    """No frames during the trial (the line paused) proves nothing against the model: the old
    model comes back, nothing is recorded as rejected, and the next pass tries it again."""
    state, _, _ = hq_server
    hq_publish.publish_bundle(state, v2)
    camera = NoiseCamera()
    monkeypatch.setattr(service, "open_source", lambda spec: camera)
    app = make_appliance(source=0, commit_timeout_s=1)
    swap_model, swaps = app.swap_model, []

    def swap_pausing_the_first_trial(runtime):
        swaps.append(runtime.version)
        camera.paused = swaps == [2]          # the line pauses during the first trial only
        swap_model(runtime)
    app.swap_model = swap_pausing_the_first_trial
    app.start()
    result = wait_for(synced(app, "deferred"), what="the deferred trial")
    assert "line idle" in result["model"]["reason"] and result["ok"]
    assert app.runtime.version == 1 and current_version(app) is None
    assert all(m["state"] != "rejected" for m in app.store.model_states())
    assert fleet_entry(state)["last_install"]["state"] == "deferred"
    wait_for(synced(app, "installed"), what="the retried install")     # frames come again
    assert app.runtime.version == 2 and current_version(app) == 2


def test_a_model_too_slow_for_the_camera_is_rejected(make_appliance, hq_server, v2, monkeypatch):
    state, _, _ = hq_server
    hq_publish.publish_bundle(state, v2)
    monkeypatch.setattr(service, "open_source", lambda spec: NoiseCamera())
    app = make_appliance(source=0, commit_timeout_s=1)
    app._open_runtime = slowed(app._open_runtime, 0.5)      # 2 judgements a second, camera at 50
    app.start()
    result = wait_for(synced(app, "rejected"), what="the rejection")
    assert result["model"]["reason"].startswith("rolled back to v1: too slow")
    assert app.runtime.version == 1 and fleet_entry(state)["last_install"]["state"] == "rejected"


def test_stop_ends_an_idle_sync_thread_promptly(make_appliance):
    app = make_appliance(sync_interval_s=3600)
    app.start()
    time.sleep(0.3)
    assert app._sync_thread.is_alive()
    started = time.monotonic()
    app.stop()
    assert time.monotonic() - started < STOP_JOIN_S   # not the sync interval
    assert not app._sync_thread.is_alive() and not app._thread.is_alive()


def test_stop_during_a_trial_neither_commits_nor_rejects(make_appliance, hq_server, v2):
    state, _, _ = hq_server
    hq_publish.publish_bundle(state, v2)
    app = make_appliance(commit_after_inspections=10_000, commit_timeout_s=600)
    app.start()
    wait_for(lambda: app.runtime.version == 2, what="the swap")
    started = time.monotonic()
    app.stop()
    assert time.monotonic() - started < STOP_JOIN_S    # not the sync interval
    assert not app._sync_thread.is_alive()
    assert app.runtime.version == 1 and current_version(app) is None
    with Store(app.cfg.db_path) as store:               # v2 is tried again on the next start
        assert {m["version"]: m["state"] for m in store.model_states()} == {1: "active"}


@pytest.mark.parametrize("overrides", [{"sync_interval_s": 0}, {"hq_url": None}])
def test_no_sync_thread_without_hq_or_with_interval_zero(make_appliance, overrides):
    app = make_appliance(**overrides)
    app.start()
    assert app._sync_thread is None
    app.stop()


@pytest.mark.parametrize("key,value,words", [
    ("sync_interval_s", -1, "sync_interval_s: 300"),
    ("sync_interval_s", "often", "sync_interval_s"),
    ("commit_after_inspections", 0, "commit_after_inspections: 20"),
    ("commit_after_inspections", 2.5, "whole number"),
    ("commit_timeout_s", 0, "commit_timeout_s: 60"),
])
def test_bad_sync_settings_are_refused(key, value, words):
    with pytest.raises(ConfigError, match=words):
        config_from_dict({key: value})


def test_saved_frames_are_pruned_while_the_appliance_runs(make_appliance, monkeypatch):
    """retention_days (here about 0.9 s) is enforced by the running service, not only by tests."""
    monkeypatch.setattr(service, "PRUNE_INTERVAL_S", 0.2)
    monkeypatch.setattr(service, "open_source", lambda spec: NoiseCamera())
    app = make_appliance(hq_url=None, save_frames=True, retention_days=1e-5, source=0)
    app.start()
    pruned = "SELECT count(*) AS n FROM inspections WHERE frame_path IS NULL"   # saved, then expired
    wait_for(lambda: app.store._query(pruned)[0]["n"] > 0, what="expired frames pruned")


# ---------------------------------------------------------------- INT8 golden-check failure

@pytest.fixture(scope="module")
def v1_int8_off(tiny_bundle, tmp_path_factory) -> Path:
    """The tiny bundle (v1) whose INT8 graphs disagree with their golden set, as the 8-bit
    default bundle's did on an AVX2-only CPU (worst delta 3.68); its fp32 rewards are right."""
    source, public, _ = tiny_bundle
    bundle = tmp_path_factory.mktemp("int8-off") / "el-solar-v1"
    shutil.copytree(source, bundle)
    expected_file = bundle / "golden" / "expected.json"
    expected = json.loads(expected_file.read_text())
    for row in expected:
        row["rewards"] = [r + 3.68 for r in row["rewards"]]
    expected_file.write_text(json.dumps(expected))
    return resign(bundle, public.with_suffix(".key"), version=1)


def test_int8_golden_failure_starts_on_fp32_and_says_so_everywhere(make_appliance, hq_server, v1_int8_off):
    from appliance import metrics, ui
    state, _, _ = hq_server
    app = make_appliance(bundle=str(v1_int8_off))        # default policy: on_golden_failure: fp32
    assert app.runtime.precision == "fp32" and not app.runtime.backend.quantized
    status = app.status()
    golden = status["golden"]
    assert golden["ok"] and golden["fallback"] and golden["precision"] == "fp32"
    assert not golden["int8"]["ok"] and golden["int8"]["worst_reward_delta"] == pytest.approx(3.68, abs=0.01)
    assert status["platform"]["provider"] == "CPUExecutionProvider" and "isa" in status["platform"]
    exposition = metrics.render().decode()
    assert "linejudge_golden_fp32_fallback 1.0" in exposition
    assert 'linejudge_platform_info{' in exposition and 'precision="fp32"' in exposition
    banner, _, engineer = ui.status_view(app)
    assert "Backup model in use" in ui.live_view(app)[1] and "Backup model in use" in banner
    assert "INT8 FAILED" in engineer and status["alarms"][0]["kind"] == "model"
    assert "fp32 graphs" in app.store.model_states()[0]["reason"]
    app.start()
    wait_for(lambda: app.last_sync and app.last_sync["status_reported"], what="a status report to HQ")
    assert inspected(app) > 0                              # the line is inspected, on fp32
    entry = fleet_entry(state)
    assert entry["precision"] == "fp32" and entry["golden"]["fallback"] is True
    assert entry["golden"]["int8"]["worst_frame"].startswith("golden_")
    assert entry["platform"]["isa"] == status["platform"]["isa"]


def test_int8_golden_failure_refuses_with_the_cause_under_refuse(make_appliance, v1_int8_off):
    from models.errors import ModelError
    with pytest.raises(ModelError) as refused:
        make_appliance(bundle=str(v1_int8_off), on_golden_failure="refuse")
    message = str(refused.value)
    assert "INT8 results differ on this CPU" in message and "worst reward delta 3.68" in message
    assert "the fp32 graphs pass" in message and "on_golden_failure: fp32" in message
    assert "linejudge bundle requantize" in message


def test_a_bundle_whose_fp32_graphs_fail_too_is_refused_under_the_default(make_appliance, v2_bad_golden):
    from models.errors import ModelError
    with pytest.raises(ModelError, match="the fp32 graphs fail too"):
        make_appliance(bundle=str(v2_bad_golden))


def test_on_golden_failure_accepts_only_its_two_policies():
    assert config_from_dict({}).on_golden_failure == "fp32"
    with pytest.raises(ConfigError, match="on_golden_failure must be fp32 or refuse"):
        config_from_dict({"on_golden_failure": "ignore"})


def test_an_expired_installed_bundle_keeps_inspecting_with_an_alarm_and_a_metric(make_appliance, tiny_bundle,
                                                                                    tmp_path):
    """An appliance cut off from HQ must not stop the line on its bundle's expiry date: the
    bundle it already runs goes on, with an alarm and a metric; an expired one is never installed."""
    from appliance import metrics, models_install
    from models.errors import ModelError
    source, public, _ = tiny_bundle
    expired = tmp_path / "expired"
    shutil.copytree(source, expired)
    manifest = json.loads((expired / lib.MANIFEST).read_text())
    manifest.update(created="2025-01-01T00:00:00Z", expires="2025-02-01T00:00:00Z")
    lib.write_manifest(expired, manifest)
    lib.sign_bundle(expired, public.with_suffix(".key"))
    with pytest.raises(ModelError, match="expired"):
        models_install.stage(expired, tmp_path / "staging", [public], "el-solar", None)
    app = make_appliance(bundle=str(expired), hq_url=None, sync_interval_s=0)
    app.start()
    wait_for(lambda: app.live.judgement is not None, what="an inspection with the expired bundle")
    alarms = app.status()["alarms"]
    assert [a["kind"] for a in alarms] == ["model"] and "passed its expiry date" in alarms[0]["text"], alarms
    assert "linejudge_bundle_expired 1.0" in metrics.render().decode()
