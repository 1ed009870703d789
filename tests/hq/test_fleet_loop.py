"""The whole fleet loop on loopback: reviews on appliance a1 -> sync -> HQ retrain (tiny) ->
signed v2 -> both appliances pull, verify and install it; lineage names the reviews."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from appliance import models_install
from appliance.config import ApplianceConfig
from models.preprocess import read_image
from appliance.service import Appliance
from appliance.sync import sync_once
from export.build_bundle import export_with_settings
from models import bundle as lib
from training.config import load_config
from training.data import elpv
from tests.helpers import BackgroundServer
from training.hq import server as hq
from training.hq import publish as hq_publish, state as hq_state
from training.hq.retrain import RetrainError, RetrainOptions, gate, retrain, split_by_inspection

ROOT = Path(__file__).resolve().parents[2]
FLEET_TINY = ROOT / "training" / "configs" / "fleet-tiny.yaml"
LINE = "el-solar"
# The loop runs on both HQ stores; the tiny retrain is the same on both (it reads the same reviews),
# so the second store resumes the first one's finished run instead of training it again (a resumed
# retrain is refused unless this store holds exactly the reviews it trained on, then it re-measures,
# exports and publishes into this store): the loop trains once per test session, not twice.
FINISHED_RETRAIN: list[Path] = []


def _appliance(tmp: Path, name: str, bundle: Path, public: Path, url: str, token: str) -> Appliance:
    token_file = tmp / f"{name}.token"
    token_file.write_text(token + "\n")
    cfg = ApplianceConfig(state_dir=tmp / name, bundle=bundle, trusted_keys=(public,), line=LINE,
                          hq_url=url, hq_token_file=token_file, station=name)
    return Appliance(cfg)


def _review_frames(app: Appliance, frames, chosen: str) -> list[int]:
    """Judge each frame; the operator picks `chosen` for every one of them."""
    ids = []
    for frame in frames:
        iid, _ = app.inspect(frame)
        app.store.add_review(iid, "operator", chosen)
        ids.append(iid)
    return ids


def _least_liked(app: Appliance, frames) -> str:
    """The catalog explanation the current model ranks lowest on these frames: reviews that
    correct the model, which a better model has to learn."""
    totals: dict[str, float] = {}
    for frame in frames:
        j = app.runtime.judge(frame)
        for text, reward in zip(j.texts, j.rewards):
            totals[text] = totals.get(text, 0.0) + float(reward)
    return min(totals, key=totals.get)


@pytest.fixture()
def fleet(tiny_run, tiny_bundle, tmp_path, hq_store):
    bundle, public, _ = tiny_bundle
    state = hq_state.open_state(tmp_path / "hq", hq_store)
    tokens = {name: hq_state.add_appliance(state, name) for name in ("a1", "a2")}
    hq_publish.publish_bundle(state, bundle)
    with BackgroundServer(hq.create_hq_app(state, admin_token="admin")) as srv:
        apps = {name: _appliance(tmp_path, name, bundle, public, srv.url, tokens[name]) for name in tokens}
        yield {"state": state, "apps": apps, "public": public, "private": public.with_suffix(".key"),
               "key_id": public.stem, "run": tiny_run[0], "tmp": tmp_path}
        for app in apps.values():
            app.store.close()
    state.close()


@pytest.mark.parametrize("hq_store", ["sqlite", "postgresql"], indirect=True)
def test_reviews_train_a_new_bundle_that_every_appliance_installs(fleet, tmp_path_factory):
    a1, a2 = fleet["apps"]["a1"], fleet["apps"]["a2"]
    frames = [read_image(c.path) for c in elpv.cells_for("train", limit=10, seed=5)]
    chosen = _least_liked(a1, frames)
    reviewed = _review_frames(a1, frames, chosen)
    a2.inspect(frames[0])                                         # a2 inspects, never reviews

    sent = sync_once(a1.cfg, a1.store)
    assert sent["ok"] and sent["pending"] == 0, sent
    outbox = a1.store._query("SELECT idempotency_key FROM outbox")
    stored = hq_state.feedback_records(fleet["state"])
    assert sorted(r["idempotency_key"] for r in stored) == sorted(r["idempotency_key"] for r in outbox)
    assert all(r["appliance_id"] == "a1" for r in stored)

    out = fleet["tmp"] / "fleet-run"
    if FINISHED_RETRAIN:          # the other HQ store's finished run: resumed, it re-reads this store's
        shutil.copytree(FINISHED_RETRAIN[0], out, ignore=shutil.ignore_patterns("bundle"))   # reviews
    report = retrain(load_config(FLEET_TINY), RetrainOptions(
        hq_state=fleet["state"], base_run=fleet["run"], out=out, line=LINE,
        key=fleet["private"], key_id=fleet["key_id"], gate_points=100.0, fleet_repeat=3,   # tiny model: val noise
        export_val_limit=24, calibration_frames=16, int8_gate=(("gate_points", 100.0), ("gate_binary", 0.0), ("gate_top1", 0.0))),
        export_with_settings)
    if not FINISHED_RETRAIN:      # kept for the session: a passed test's tmp_path is removed (pyproject)
        FINISHED_RETRAIN[:] = [tmp_path_factory.mktemp("finished-retrain") / "fleet-run"]
        shutil.copytree(out, FINISHED_RETRAIN[0], ignore=shutil.ignore_patterns("bundle"))
    assert report["after"]["fleet_heldout_pairwise"] > report["before"]["fleet_heldout_pairwise"]
    assert report["published"]["version"] == 2 and report["published"]["parent_version"] == 1
    assert (fleet["tmp"] / "fleet-run" / "retrain.png").stat().st_size > 0

    for app in (a1, a2):
        result = sync_once(app.cfg, app.store)
        assert result["ok"] and result["model"]["action"] == "installed", result
        assert result["sent"] == 0
    again = sync_once(a1.cfg, a1.store)
    assert again["sent"] == 0 and again["model"]["action"] == "up-to-date"
    assert len(hq_state.feedback_records(fleet["state"])) == len(stored)      # nothing duplicated

    for name in ("a1", "a2"):
        cfg = fleet["apps"][name].cfg
        active = models_install.active_bundle(cfg.bundles_dir, cfg.bundle)
        manifest = json.loads((active / lib.MANIFEST).read_text())
        assert manifest["version"] == 2 and manifest["lineage"]["parent_version"] == 1
        trained_on = set(manifest["lineage"]["feedback_ids"])
        assert trained_on == set(report["feedback_ids"]) and trained_on
        assert all(key.startswith("a1/pref-") for key in trained_on)
        assert {int(k.split("-")[1]) for k in trained_on} <= set(reviewed)
        assert not trained_on & set(report["heldout_feedback_ids"])
    fleet["apps"]["a1"].store.close()
    restarted = Appliance(a1.cfg)                                  # the service restarts on v2
    fleet["apps"]["a1"] = restarted
    iid, judgement = restarted.inspect(frames[0])
    versions = {r["id"]: r["model_version"] for r in restarted.store._query("SELECT id, model_version FROM inspections")}
    assert judgement.model_version == 2 and versions[iid] == 2
    assert {versions[i] for i in reviewed} == {1}
    fleet_view = {a["appliance_id"]: a for a in hq_state.fleet(fleet["state"])}
    assert fleet_view["a1"]["model_version"] == 2 and fleet_view["a2"]["model_version"] == 2


def test_retrain_without_reviews_says_what_to_do(fleet):
    with pytest.raises(RetrainError, match="sync their reviews first"):
        retrain(load_config(FLEET_TINY), RetrainOptions(hq_state=fleet["state"], base_run=fleet["run"],
                                                        out=fleet["tmp"] / "none"))


def test_gate_blocks_regressions_and_requires_a_fleet_gain():
    old = {"elpv_val_pairwise": 0.90, "golden_accuracy": 1.0, "fleet_heldout_pairwise": 0.4}
    assert gate(old, {**old, "fleet_heldout_pairwise": 0.8, "elpv_val_pairwise": 0.896}, 0.5) == []
    worse = gate(old, {**old, "fleet_heldout_pairwise": 0.8, "elpv_val_pairwise": 0.89}, 0.5)
    assert len(worse) == 1 and "elpv_val_pairwise" in worse[0]
    golden = gate(old, {**old, "fleet_heldout_pairwise": 0.8, "golden_accuracy": 0.875}, 0.5)
    assert len(golden) == 1 and "golden_accuracy" in golden[0]
    same = gate(old, old, 0.5)
    assert len(same) == 1 and "did not improve" in same[0]


def test_heldout_reviews_are_whole_inspections_and_stable():
    pairs = [{"inspection": f"a1/{i}", "key": f"a1/pref-{i}-{j}"} for i in range(10) for j in range(3)]
    train, held = split_by_inspection(pairs, 0.2)
    assert len({p["inspection"] for p in held}) == 2 and len(train) + len(held) == len(pairs)
    assert not {p["inspection"] for p in train} & {p["inspection"] for p in held}
    _, held_again = split_by_inspection(list(reversed(pairs)), 0.2)     # order of arrival does not matter
    assert {p["inspection"] for p in held_again} == {p["inspection"] for p in held}


def test_a_fleet_config_cannot_be_run_by_train(tmp_path):
    from models.errors import ConfigError
    from training.train import train
    with pytest.raises(ConfigError, match="hq retrain"):
        train(load_config(FLEET_TINY), tmp_path / "x")
