"""The decide step: verdict, confidence and each flag reason."""
import numpy as np

from appliance.decide import Thresholds, decide, image_reliance, ood_distance, p_best

TEXTS = ["crack upper left", "no defect", "stain center"]
OOD = {"mean": [0.0, 0.0], "std": [1.0, 1.0]}
PATCHES = np.zeros((4, 2), np.float32)


def test_verdict_is_the_top_reward_and_p_best_is_bradley_terry():
    d = decide(TEXTS, np.array([2.0, 0.0, -1.0]), np.zeros(3), PATCHES, Thresholds(), OOD)
    assert d.verdict == "crack upper left"
    assert [t for t, _ in d.ranking] == ["crack upper left", "no defect", "stain center"]
    assert abs(d.p_best - 1 / (1 + np.exp(-2.0))) < 1e-9
    assert not d.flagged and d.reasons == []


def test_close_call_is_flagged_with_its_reason():
    d = decide(TEXTS, np.array([0.1, 0.0, -3.0]), np.zeros(3), PATCHES, Thresholds(p_best=0.75), OOD)
    assert d.flagged and d.reasons[0].startswith("low confidence")


def test_threshold_is_a_runtime_setting():
    rewards = np.array([1.0, 0.0, -3.0])     # p_best = 0.73
    assert not decide(TEXTS, rewards, np.zeros(3), PATCHES, Thresholds(p_best=0.7), OOD).flagged
    assert decide(TEXTS, rewards, np.zeros(3), PATCHES, Thresholds(p_best=0.8), OOD).flagged


def test_unusual_frame_is_flagged():
    far = np.full((4, 2), 10.0, np.float32)
    d = decide(TEXTS, np.array([3.0, 0.0, -3.0]), np.zeros(3), far, Thresholds(), OOD)
    assert any(r.startswith("unusual frame") for r in d.reasons)
    assert ood_distance(np.zeros(2), OOD) == 0.0


def test_text_only_judgement_is_flagged():
    rewards = np.array([3.0, 0.0, -3.0])
    d = decide(TEXTS, rewards, rewards - 0.5, PATCHES, Thresholds(), OOD)   # frame changes nothing
    assert any(r.startswith("image barely matters") for r in d.reasons)
    assert image_reliance(rewards, np.zeros(3)) > 0.9


def test_single_candidate():
    assert p_best(np.array([0.3])) == 1.0


def test_thresholds_from_manifest_with_overrides():
    t = Thresholds.from_manifest({"p_best": 0.6, "ood_distance": 4, "extra": 1}, p_best=0.9)
    assert (t.p_best, t.ood_distance) == (0.9, 4.0)
