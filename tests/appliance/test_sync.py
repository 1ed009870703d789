"""appliance.sync against a real HQ (uvicorn on loopback) behind a fault-injecting TCP proxy."""
from __future__ import annotations

import collections
import json
import random
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest

from appliance import models_install
from appliance.config import ApplianceConfig
from appliance.store import Store
from appliance.sync import RetryPolicy, sync_once
from models import bundle as lib
from tests.fault_proxy import FaultProxy
from tests.helpers import BackgroundServer
from training.hq import server as hq
from training.hq import publish as hq_publish, state as hq_state

LINE = "el-solar"
RANKING = [("crack in the upper left cell", 2.0), ("finger interruption", 1.0),
           ("burn mark lower right", 0.5), ("no defect", -1.0)]


class FakeTime:
    """sleep() records and advances a clock instead of waiting."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


# ---------------------------------------------------------------- fixtures

def make_bundle(root: Path, private_key: Path, version: int, size: int = 60_000,
                created: datetime | None = None) -> Path:
    out = root / f"{LINE}-v{version}"
    (out / "golden").mkdir(parents=True)
    rng = random.Random(version)
    (out / "scorer.onnx").write_bytes(rng.randbytes(size))
    (out / "image_encoder.onnx").write_bytes(rng.randbytes(size // 2))
    (out / "catalog.yaml").write_text(f"version: {version}\n")
    (out / "golden" / "expected.json").write_text("[]")
    manifest = lib.build_manifest(out, line=LINE, version=version, expires_days=30, compatible={"input": {}},
                                  preprocessing={}, thresholds={}, ood={}, lineage={}, metrics={}, now=created)
    lib.write_manifest(out, manifest)
    lib.sign_bundle(out, private_key)
    return out


@pytest.fixture()
def world(tmp_path, hq_store):
    """HQ with an admin token and appliance a1; keys; the appliance's start bundle v1."""
    state = hq_state.open_state(tmp_path / "hq", hq_store)
    token = hq_state.add_appliance(state, "a1")
    private, public = lib.generate_keypair(tmp_path / "keys", "hq")
    v1 = make_bundle(tmp_path / "src", private, 1)
    with BackgroundServer(hq.create_hq_app(state, admin_token="admin")) as srv:
        yield {"state": state, "token": token, "private": private, "public": public, "v1": v1,
               "srv": srv, "tmp": tmp_path}
    state.close()


def appliance(world, url: str, bundle: Path | None = None) -> tuple[ApplianceConfig, Store]:
    token_file = world["tmp"] / "token"
    token_file.write_text(world["token"] + "\n")
    cfg = ApplianceConfig(state_dir=world["tmp"] / "app", bundle=bundle or world["v1"],
                          trusted_keys=(world["public"],), line=LINE, hq_url=url, hq_token_file=token_file)
    store = Store(cfg.db_path, cfg.frames_dir)
    manifest = json.loads((cfg.bundle / lib.MANIFEST).read_text())
    store.record_model(manifest["version"], "active", "started")
    return cfg, store


def review_some(store: Store, n: int, frames: bool = True) -> None:
    for i in range(n):
        iid = store.log_inspection(line=LINE, station="s1", model_version=1, verdict=RANKING[0][0], best_score=2.0,
                                   p_best=0.6, flagged=True, reasons=["low confidence"], ranking=RANKING,
                                   latency_ms=10.0, frame_png=f"frame-{i}".encode() * 50 if frames else None)
        store.add_review(iid, "operator", RANKING[1][0])


def client() -> httpx.Client:
    """No keep-alive: every request opens a connection, so every request meets the proxy's dice."""
    return httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))


def publish(world, version: int, **kw) -> Path:
    return hq_publish.publish_bundle(world["state"], make_bundle(world["tmp"] / f"pub{version}", world["private"],
                                                         version, **kw))


def fleet_entry(world) -> dict:
    return next(a for a in hq_state.fleet(world["state"]) if a["appliance_id"] == "a1")


class Swap:
    def __init__(self, ok=True, reason=""):
        self.ok, self.reason, self.calls = ok, reason, []

    def __call__(self, staged: Path, manifest: dict):
        self.calls.append((Path(staged), manifest["version"]))
        assert json.loads((Path(staged) / lib.MANIFEST).read_text()) == manifest   # the verified copy
        return self.ok, self.reason


# ---------------------------------------------------------------- outbox

@pytest.mark.parametrize("hq_store", ["sqlite", "postgresql"], indirect=True)
def test_every_outbox_row_reaches_hq_exactly_once_through_a_faulty_network(world):
    publish(world, 2)
    proxy = FaultProxy(world["srv"].port, seed=11, reset=0.3, drop=0.1, cut=0.08, busy=0.05, outage=(40, 75),
                       drop_first=("POST /v1/appliances/a1/feedback",))
    cfg, store = appliance(world, proxy.url)
    review_some(store, 25)                                   # 25 reviews x 4 outbox rows, 25 frames
    fake, swap, results = FakeTime(), Swap(), []
    try:
        with client() as c:
            for _ in range(30):
                results.append(sync_once(cfg, store, client=c, swap=swap, sleep=fake.sleep, clock=fake.clock,
                                         rng=random.Random(len(results)),
                                         policy=RetryPolicy(max_attempts=5, budget_s=120)))
                if results[-1]["ok"] and results[-1]["pending"] == 0 and results[-1]["model"]["action"] == "up-to-date":
                    break
    finally:
        proxy.close()
    outbox = store._query("SELECT idempotency_key, sent_at FROM outbox")
    at_hq = [r["idempotency_key"] for r in hq_state.feedback_records(world["state"]) if r["appliance_id"] == "a1"]
    assert len(outbox) == 100
    assert all(r["sent_at"] for r in outbox)
    assert sorted(at_hq) == sorted(r["idempotency_key"] for r in outbox)     # each exactly once
    assert collections.Counter(at_hq).most_common(1)[0][1] == 1
    frames = {r["payload"]["frame_sha256"] for r in hq_state.feedback_records(world["state"])}
    assert len(frames) == 25 and all(hq_state.frame_path(world["state"], sha).is_file() for sha in frames)
    # the network really misbehaved, and the passes survived it without raising
    assert proxy.fates["reset"] > 5 and proxy.fates["outage"] == 35
    dropped = [line for fate, line in proxy.seen if fate == "drop"]
    assert any(line.startswith("POST /v1/appliances/a1/feedback") for line in dropped)   # HQ stored, answer lost
    assert any(not r["ok"] for r in results) and results[-1]["ok"]
    assert 3.0 in fake.sleeps                                 # Retry-After of the busy answers
    # the bundle came through as well (resumed with Range after cut connections)
    assert [v for _, v in swap.calls] == [2]
    assert models_install.active_bundle(cfg.bundles_dir, cfg.bundle) == swap.calls[0][0].resolve()
    assert fleet_entry(world)["model_version"] == 2 and fleet_entry(world)["backlog"] == 0
    store.close()


def sync_through_proxy(world, reviews: int, frames: bool = True, faults: dict | None = None, **sync_kw):
    """One sync pass on fake time through a FaultProxy with `faults`, after `reviews` reviews;
    returns (result, the fake clock, the store)."""
    proxy = FaultProxy(world["srv"].port, **(faults or {}))
    cfg, store = appliance(world, proxy.url)
    review_some(store, reviews, frames=frames)
    fake = FakeTime()
    try:
        with client() as c:
            result = sync_once(cfg, store, client=c, swap=Swap(), sleep=fake.sleep, clock=fake.clock, **sync_kw)
    finally:
        proxy.close()
    return result, fake, store


def test_rows_are_marked_sent_only_on_2xx_and_retry_after_is_honoured(world):
    result, fake, store = sync_through_proxy(world, 2, frames=False, faults=dict(busy=1.0),
                                             policy=RetryPolicy(max_attempts=4, budget_s=1000))
    assert not result["ok"] and result["sent"] == 0 and result["pending"] == 8
    assert "503" in " ".join(result["errors"])
    assert fake.sleeps and set(fake.sleeps) == {3.0}
    assert hq_state.feedback_records(world["state"]) == []
    rows = store._query("SELECT sent_at, attempts FROM outbox")
    assert all(r["sent_at"] is None and r["attempts"] == 4 for r in rows)
    store.close()


def test_backoff_is_exponential_with_full_jitter_within_the_budget(world):
    policy = RetryPolicy(base_s=1.0, cap_s=4.0, max_attempts=5, budget_s=30)
    result, fake, store = sync_through_proxy(world, 1, faults=dict(reset=1.0),
                                             rng=random.Random(3), policy=policy)
    assert not result["ok"] and result["pending"] == 4 and result["model"]["action"] == "error"
    bounds = [1.0, 2.0, 4.0, 4.0]                       # min(cap, base * 2**attempt)
    for i, delay in enumerate(fake.sleeps):
        assert 0 <= delay <= bounds[i % 4]
    assert len(set(fake.sleeps)) == len(fake.sleeps)    # jittered, not fixed
    assert fake.now <= policy.budget_s
    store.close()


def test_read_timeout_is_retried_and_ends_the_pass(world):
    result, fake, store = sync_through_proxy(world, 1, frames=False, faults=dict(hang=1.0),
                                             policy=RetryPolicy(max_attempts=2), timeout=httpx.Timeout(0.15))
    assert not result["ok"] and "ReadTimeout" in result["errors"][0] and result["pending"] == 4
    assert len(fake.sleeps) == 3                      # one retry each: outbox, manifest, status
    store.close()


def test_budget_ends_the_pass(world):
    result, fake, store = sync_through_proxy(world, 1, faults=dict(busy=1.0),
                                             policy=RetryPolicy(max_attempts=50, budget_s=7))
    assert not result["ok"] and "budget" in " ".join(result["errors"])
    assert fake.now <= 7
    store.close()


def test_no_hq_never_raises(world, tmp_path):
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    cfg, store = appliance(world, f"http://127.0.0.1:{port}")
    review_some(store, 1)
    fake = FakeTime()
    result = sync_once(cfg, store, swap=Swap(), sleep=fake.sleep, clock=fake.clock,
                       policy=RetryPolicy(max_attempts=2))
    assert not result["ok"] and result["pending"] == 4 and result["errors"]
    missing = ApplianceConfig(state_dir=cfg.state_dir, bundle=cfg.bundle, hq_url=cfg.hq_url,
                              hq_token_file=tmp_path / "nope")
    result = sync_once(missing, store, sleep=fake.sleep)
    assert not result["ok"] and "hq_token_file" in result["errors"][0]
    assert not sync_once(ApplianceConfig(state_dir=cfg.state_dir), store)["ok"]
    store.close()


def test_wrong_token_stops_the_pass(world):
    cfg, store = appliance(world, world["srv"].url)
    Path(cfg.hq_token_file).write_text("a1.not-the-token")
    review_some(store, 1)
    fake = FakeTime()
    result = sync_once(cfg, store, swap=Swap(), sleep=fake.sleep, clock=fake.clock)
    assert not result["ok"] and "401" in result["errors"][0] and len(result["errors"]) == 1
    assert fake.sleeps == [] and result["pending"] == 4
    store.close()


# ---------------------------------------------------------------- bundles

def run(world, cfg, store, swap, **kw):
    fake = FakeTime()
    return sync_once(cfg, store, swap=swap, sleep=fake.sleep, clock=fake.clock, **kw)


def test_newer_bundle_is_installed_and_reported(world):
    publish(world, 2)
    cfg, store = appliance(world, world["srv"].url)
    swap = Swap()
    result = run(world, cfg, store, swap)
    assert result["ok"], result
    assert result["model"]["action"] == "installed" and result["model"]["offered"] == 2
    staged = swap.calls[0][0]
    assert (cfg.bundles_dir / "current").resolve() == staged.resolve()
    assert {m["version"]: m["state"] for m in store.model_states()} == {2: "active", 1: "previous"}
    assert not (Path(cfg.state_dir) / "downloads" / f"{LINE}-v2").exists()
    entry = fleet_entry(world)
    assert entry["model_version"] == 2 and entry["last_install"]["state"] == "active"
    again = run(world, cfg, store, swap)
    assert again["ok"] and again["model"]["action"] == "up-to-date" and len(swap.calls) == 1


def test_failed_golden_check_keeps_the_old_model(world):
    publish(world, 2)
    cfg, store = appliance(world, world["srv"].url)
    swap = Swap(ok=False, reason="golden set failed")
    result = run(world, cfg, store, swap)
    assert result["model"]["action"] == "rejected" and "golden set failed" in result["model"]["reason"]
    assert not (cfg.bundles_dir / "current").exists()
    assert models_install.active_bundle(cfg.bundles_dir, cfg.bundle) == cfg.bundle
    assert not swap.calls[0][0].exists()                       # the staged copy is gone
    states = {m["version"]: (m["state"], m["reason"]) for m in store.model_states()}
    assert states[1][0] == "active" and states[2][0] == "rejected" and "golden set failed" in states[2][1]
    assert fleet_entry(world)["last_install"]["state"] == "rejected"
    assert fleet_entry(world)["model_version"] == 1
    again = run(world, cfg, store, swap)                       # not downloaded and tried again
    assert again["model"]["action"] == "skipped" and len(swap.calls) == 1


def test_swap_that_raises_is_a_rejection_not_a_crash(world):
    publish(world, 2)
    cfg, store = appliance(world, world["srv"].url)

    def swap(staged, manifest):
        raise RuntimeError("runtime would not load")
    result = run(world, cfg, store, swap)
    assert result["model"]["action"] == "rejected" and "would not load" in result["model"]["reason"]
    assert models_install.active_bundle(cfg.bundles_dir, cfg.bundle) == cfg.bundle


@pytest.mark.parametrize("tamper", ["same-size", "longer", "manifest"])
def test_tampered_bundle_from_hq_is_refused(world, tamper):
    published = publish(world, 2)
    target = published / "scorer.onnx"
    data = bytearray(target.read_bytes())
    if tamper == "same-size":
        data[100] ^= 0xFF
        target.write_bytes(bytes(data))
    elif tamper == "longer":
        target.write_bytes(bytes(data) + b"payload")
    else:
        manifest = json.loads((published / lib.MANIFEST).read_text())
        manifest["thresholds"] = {"p_best": 0.0}
        lib.write_manifest(published, manifest)
    cfg, store = appliance(world, world["srv"].url)
    swap = Swap()
    result = run(world, cfg, store, swap)
    assert result["model"]["action"] == "rejected", result
    assert {"same-size": "sha256", "longer": "larger", "manifest": "signature"}[tamper] in result["model"]["reason"]
    assert swap.calls == []
    assert models_install.active_bundle(cfg.bundles_dir, cfg.bundle) == cfg.bundle
    assert [m["version"] for m in store.model_states() if m["state"] == "active"] == [1]
    assert not list(cfg.bundles_dir.glob("*")) if cfg.bundles_dir.exists() else True
    assert fleet_entry(world)["last_install"]["state"] == "rejected"


def test_untrusted_signer_is_refused_before_downloading(world):
    rogue, _ = lib.generate_keypair(world["tmp"] / "rogue", "hq")   # same key id, other key
    hq_publish.publish_bundle(world["state"], make_bundle(world["tmp"] / "r", rogue, 2))
    proxy = FaultProxy(world["srv"].port)
    cfg, store = appliance(world, proxy.url)
    try:
        with client() as c:
            result = sync_once(cfg, store, client=c, swap=Swap(), sleep=FakeTime().sleep)
    finally:
        proxy.close()
    assert result["model"]["action"] == "rejected" and "signature" in result["model"]["reason"]
    assert proxy.count == 3          # manifest, manifest.sig, status: no file was downloaded
    assert models_install.active_bundle(cfg.bundles_dir, cfg.bundle) == cfg.bundle


def test_downgrade_is_refused(world):
    v3 = make_bundle(world["tmp"] / "local", world["private"], 3)
    publish(world, 2)
    cfg, store = appliance(world, world["srv"].url, bundle=v3)
    swap = Swap()
    result = run(world, cfg, store, swap)
    assert result["model"]["action"] == "refused" and "downgrade" in result["model"]["reason"]
    assert result["model"]["installed"] == 3 and swap.calls == []
    assert not (Path(cfg.state_dir) / "downloads").exists()
    assert models_install.active_bundle(cfg.bundles_dir, cfg.bundle) == v3


def test_expired_bundle_is_refused_and_the_old_model_keeps_serving(world):
    stale = make_bundle(world["tmp"] / "stale", world["private"], 2,
                        created=datetime.now(timezone.utc) - timedelta(days=60))    # expired 30 days ago
    hq_publish.publish_bundle(world["state"], stale)
    cfg, store = appliance(world, world["srv"].url)
    swap = Swap()
    result = run(world, cfg, store, swap)
    assert result["model"]["action"] == "rejected" and "expired" in result["model"]["reason"], result
    assert swap.calls == []
    assert models_install.active_bundle(cfg.bundles_dir, cfg.bundle) == cfg.bundle
    assert [m["version"] for m in store.model_states() if m["state"] == "active"] == [1]
    assert fleet_entry(world)["last_install"]["state"] == "rejected"


def test_bundle_download_resumes_with_range(world):
    publish(world, 2, size=200_000)
    proxy = FaultProxy(world["srv"].port, seed=5, cut=1.0, cut_bytes=(20_000, 60_000))   # every answer cut
    cfg, store = appliance(world, proxy.url)
    swap = Swap()
    try:
        with client() as c:
            result = sync_once(cfg, store, client=c, swap=swap, sleep=FakeTime().sleep)
    finally:
        proxy.close()
    assert result["ok"] and result["model"]["action"] == "installed", result
    assert result["failures"] == 0                 # progress after a cut is not a failed attempt
    assert proxy.range_requests >= 200_000 // 60_000
    assert models_install.active_bundle(cfg.bundles_dir, cfg.bundle) == swap.calls[0][0].resolve()


def test_bundle_over_the_total_cap_is_not_downloaded(world, monkeypatch):
    from appliance import model_update
    publish(world, 2)
    monkeypatch.setattr(model_update, "MAX_BUNDLE_BYTES", 1000)
    cfg, store = appliance(world, world["srv"].url)
    swap = Swap()
    result = run(world, cfg, store, swap)
    assert not result["ok"] and "limit" in result["model"]["reason"] and swap.calls == []


@pytest.mark.parametrize("path", ["../outside.bin", "/etc/passwd", "golden/./x.png", "manifest.sig"])
def test_an_offered_manifest_with_an_unsafe_path_is_refused_before_download(world, path):
    """Sync uses the bundle's one manifest check (models.bundle.parse_manifest) on the offer."""
    published = publish(world, 2)
    manifest = json.loads((published / lib.MANIFEST).read_text())
    manifest["files"].append({"path": path, "bytes": 1, "sha256": "0" * 64})
    lib.write_manifest(published, manifest)
    cfg, store = appliance(world, world["srv"].url)
    swap = Swap()
    result = run(world, cfg, store, swap)
    assert result["ok"] is False and swap.calls == []
    assert "not a valid bundle manifest" in json.dumps(result) and path in json.dumps(result)
    assert not (Path(cfg.state_dir) / "downloads" / f"{cfg.line}-v2").exists()
