"""`hq retrain` refusals and inputs: what may train (no ELPV test frames, no empty explanations),
what a run directory may be resumed with, which runs may be --base, and checks that come first."""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from models.errors import ConfigError
from models import bundle as lib
from models.reward_model import load_model
from training.config import load_config
from training.data import elpv
from training.hq import server as hq
from training.hq import state as hq_state
from training.hq.retrain import RetrainError, RetrainOptions, base_models, retrain

ROOT = Path(__file__).resolve().parents[2]
FLEET_TINY = ROOT / "training" / "configs" / "fleet-tiny.yaml"
TINY = ROOT / "training" / "configs" / "tiny.yaml"
GOOD = "Defective: monocrystalline cell with cracks and dark inactive areas"
BAD = "No defect: monocrystalline cell fully active"


def send_reviews(state_dir: Path, batch: str, reviews: list[tuple[int, bytes, str, str]]) -> None:
    """Upload (inspection id, frame bytes, chosen, rejected) as appliance a1 would, over the HQ API."""
    state = hq_state.open_state(state_dir)
    try:
        token = hq_state.add_appliance(state, "a1")
        headers = {"Authorization": f"Bearer {token}"}
        with TestClient(hq.create_hq_app(state)) as client:
            records = []
            for inspection, frame, chosen, rejected in reviews:
                sha = hashlib.sha256(frame).hexdigest()
                assert client.put(f"/v1/frames/{sha}", content=frame, headers=headers).status_code in (200, 201)
                records.append({"idempotency_key": f"pref-{inspection}-0", "kind": "preference",
                                "payload": {"inspection_id": inspection, "chosen": chosen, "rejected": rejected,
                                            "frame_sha256": sha}})
            r = client.post("/v1/appliances/a1/feedback", json={"records": records},
                            headers={**headers, "Idempotency-Key": batch})
            assert r.status_code == 200 and not r.json()["rejected"], r.text
    finally:
        state.close()


def quick_config():
    """fleet-tiny with one epoch per stage: these tests check inputs, not learning."""
    cfg = load_config(FLEET_TINY)
    return replace(cfg, stages=tuple(replace(s, epochs=1) for s in cfg.stages))


def retrain_report(cfg, opts: RetrainOptions) -> dict:
    """The report, whether or not the tiny model passed the gate (not what these tests are about)."""
    try:
        return retrain(cfg, opts)
    except RetrainError as exc:
        if "did not pass the gate" not in str(exc):
            raise
        return json.loads((Path(opts.out) / "retrain.json").read_text())


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """HQ with six reviewed inspections of ELPV train cells, one review of an ELPV test cell (as the
    appliance's demo source replays them) and one review with a blank explanation."""
    state_dir = tmp_path_factory.mktemp("hq")
    train = [c.path.read_bytes() for c in elpv.cells_for("train", limit=6, seed=11)]
    [test_cell] = elpv.cells_for("test", limit=1, seed=0)
    send_reviews(state_dir, "batch-1", [(i, frame, GOOD, BAD) for i, frame in enumerate(train)]
                 + [(6, test_cell.path.read_bytes(), GOOD, BAD), (7, train[0], "   ", BAD)])
    return state_dir


@pytest.fixture(scope="module")
def first_run(tiny_run, reviews, tmp_path_factory):
    out = tmp_path_factory.mktemp("fleet") / "run"
    opts = RetrainOptions(hq_state=reviews, base_run=tiny_run[0], out=out, fleet_repeat=1, gate_points=100.0)
    return opts, retrain_report(quick_config(), opts)


def test_elpv_test_frames_and_blank_explanations_never_train(first_run):
    _, report = first_run
    assert report["skipped"] == {"elpv_test_frames": 1, "bad_explanations": 1}
    used = set(report["feedback_ids"]) | set(report["heldout_feedback_ids"])
    assert used == {f"a1/pref-{i}-0" for i in range(6)}
    assert report["fleet_pairs"] + report["heldout_pairs"] == 6 and report["fleet_repeat"] == 1


def test_an_interrupted_run_resumes_with_the_reviews_it_started_with(first_run, reviews, tmp_path):
    opts, report = first_run
    again = retrain_report(quick_config(), opts)                   # same inputs: the stages are reused
    assert again["stages"] == report["stages"] and again["feedback_ids"] == report["feedback_ids"]

    more = tmp_path / "hq"                                         # newer reviews wait for the next run
    shutil.copytree(reviews, more)
    frame = elpv.cells_for("train", limit=1, seed=99)[0].path.read_bytes()
    send_reviews(more, "batch-2", [(8, frame, GOOD, BAD), (9, frame, GOOD, BAD)])
    later = retrain_report(quick_config(), replace(opts, hq_state=more))
    assert later["feedback_ids"] == report["feedback_ids"] and later["stages"] == report["stages"]

    with pytest.raises(RetrainError, match="other inputs.*fleet_repeat differ.*new --out"):
        retrain(quick_config(), replace(opts, fleet_repeat=2))
    recorded = json.loads((opts.out / "fleet_inputs.json").read_text())
    assert recorded["fleet_repeat"] == 1 and "a1/pref-8-0" not in recorded["feedback_ids"]


def test_a_run_without_a_record_of_its_reviews_is_not_reused(first_run, tmp_path):
    opts, _ = first_run
    old = tmp_path / "old"                        # as left by a retrain from before the record
    shutil.copytree(opts.out, old)
    (old / "fleet_inputs.json").unlink()
    with pytest.raises(RetrainError, match="no fleet_inputs.json.*new --out"):
        retrain(quick_config(), replace(opts, out=old))


def test_a_retrain_run_can_be_the_base_of_the_next(first_run, reviews, tmp_path):
    opts, report = first_run
    teacher, _, student = base_models(opts.out)
    assert _same_weights(teacher, load_model(opts.out / "fleet" / "model"))
    assert _same_weights(student, load_model(opts.out / "distill" / "model"))
    following = retrain_report(quick_config(), replace(opts, base_run=opts.out, out=tmp_path / "next"))
    assert following["before"] == report["after"]            # it starts from the retrained student


def test_a_base_that_is_no_run_says_what_it_must_be(tmp_path):
    (tmp_path / "distill").mkdir()
    with pytest.raises(RetrainError, match="multimodal/.*fleet/.*distill/model"):
        base_models(tmp_path)


def test_a_non_fleet_config_is_refused_before_anything_runs(tiny_run, reviews, tmp_path):
    opts = RetrainOptions(hq_state=reviews, base_run=tiny_run[0], out=tmp_path / "out")
    with pytest.raises(ConfigError, match="training/configs/fleet.yaml"):
        retrain(load_config(TINY), opts)
    assert not opts.out.exists()


@pytest.mark.parametrize("repeat", [0, -1])
def test_fleet_repeat_must_be_at_least_one(tiny_run, reviews, tmp_path, repeat):
    opts = RetrainOptions(hq_state=reviews, base_run=tiny_run[0], out=tmp_path / "out", fleet_repeat=repeat)
    with pytest.raises(RetrainError, match="--fleet-repeat.*1 or more"):
        retrain(quick_config(), opts)
    assert not opts.out.exists()


def test_a_bad_signing_key_fails_before_training(tiny_run, reviews, tmp_path):
    key = tmp_path / "hq.key"
    key.write_text("not a key\n")
    opts = RetrainOptions(hq_state=reviews, base_run=tiny_run[0], out=tmp_path / "out", key=key, key_id="hq")
    with pytest.raises(lib.BundleError, match="cannot load private key"):
        retrain(quick_config(), opts)
    assert not opts.out.exists()


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].equal(sb[k]) for k in sa)
