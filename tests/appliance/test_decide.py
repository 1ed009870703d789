"""The decide step: verdict, confidence and each flag reason."""
import numpy as np
import pytest

from appliance.decide import Thresholds, decide, image_reliance, ood_distance, p_best, p_defect

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


# "no defect" wins with 0.58; the two defect candidates together hold 0.42
DEFECT_FACTS = [True, False, True]
NEAR_MISS = np.log(np.array([0.21, 0.58, 0.21]))


def test_defect_free_verdict_with_a_real_chance_of_a_defect_is_flagged():
    assert abs(p_defect(NEAR_MISS, DEFECT_FACTS) - 0.42) < 1e-9
    d = decide(TEXTS, NEAR_MISS, np.zeros(3), PATCHES, Thresholds(p_best=0.5, p_defect=0.4), OOD, DEFECT_FACTS)
    assert d.verdict == "no defect" and d.flagged
    assert d.reasons == ["possible defect: 42% chance of a defect behind a defect-free verdict (threshold 40%)"]
    calm = decide(TEXTS, NEAR_MISS, np.zeros(3), PATCHES, Thresholds(p_best=0.5, p_defect=0.45), OOD, DEFECT_FACTS)
    assert not calm.flagged


def test_possible_defect_needs_a_threshold_known_facts_and_a_defect_free_verdict():
    loose = Thresholds(p_best=0.5, p_defect=0.01)
    assert not decide(TEXTS, NEAR_MISS, np.zeros(3), PATCHES, Thresholds(p_best=0.5), OOD, DEFECT_FACTS).flagged
    assert not decide(TEXTS, NEAR_MISS, np.zeros(3), PATCHES, loose, OOD).flagged                  # facts unknown
    assert not decide(TEXTS, NEAR_MISS, np.zeros(3), PATCHES, loose, OOD, [True, None, True]).flagged  # verdict's unknown
    defect_wins = np.log(np.array([0.58, 0.21, 0.21]))
    assert not decide(TEXTS, defect_wins, np.zeros(3), PATCHES, loose, OOD, DEFECT_FACTS).flagged


def test_p_defect_comes_from_the_manifest_and_the_config_may_override_it():
    assert Thresholds.from_manifest({"p_defect": None}).p_defect is None      # bundles without one: off
    assert Thresholds.from_manifest({"p_defect": 0.15}).p_defect == 0.15
    assert Thresholds.from_manifest({"p_defect": 0.15}, p_defect=0.3).p_defect == 0.3


def test_free_text_verdicts_keep_their_own_confidence_threshold():
    close = np.array([0.5, 0.0, -3.0])            # p_best = 0.62, the verdict is candidate 0
    t = Thresholds(p_best=0.5, p_best_free_text=0.7)
    assert not decide(TEXTS, close, np.zeros(3), PATCHES, t, OOD, [True, False, True]).flagged
    free = decide(TEXTS, close, np.zeros(3), PATCHES, t, OOD, [None, False, True])
    assert free.reasons == ["low confidence: best beats runner-up with p=0.62 (threshold 0.70)"]
    assert decide(TEXTS, close, np.zeros(3), PATCHES, t, OOD).flagged          # no facts at all


def test_config_overrides_reach_free_text_and_can_switch_possible_defect_off():
    manifest = {"p_best": 0.5, "p_best_free_text": 0.73, "p_defect": 0.11}
    stricter = Thresholds.from_manifest(manifest, p_best=0.9)
    assert (stricter.p_best, stricter.p_best_free_text) == (0.9, 0.9)
    assert Thresholds.from_manifest(manifest, p_defect=None).p_defect is None
    assert Thresholds.from_manifest(manifest, p_best=None).p_best == 0.5     # required ones stay


def test_facts_given_as_numpy_booleans_work_the_same():
    d = decide(TEXTS, NEAR_MISS, np.zeros(3), PATCHES, Thresholds(p_best=0.5, p_defect=0.4), OOD,
               list(np.array(DEFECT_FACTS)))
    assert d.flagged and d.reasons[0].startswith("possible defect")


def test_a_frame_that_cannot_show_a_part_is_always_flagged():
    """Lens cap, dead camera, blown exposure, flat grey, sensor noise: flagged with a plain reason,
    however sure the model is; a real ELPV cell is not."""
    from models.preprocess import frame_problem
    from training.data import elpv
    rng = np.random.default_rng(0)
    frames = [("all dark", np.zeros((160, 160), np.uint8)),
              ("all dark", np.clip(rng.normal(6, 1.5, (160, 160)), 0, 255).astype(np.uint8)),
              ("all white", np.full((160, 160), 255, np.uint8)),
              ("flat grey", np.full((160, 160), 128, np.uint8)),
              ("only noise", rng.integers(0, 256, (160, 160)).astype(np.uint8)),
              ("only noise", np.clip(rng.normal(8, 4, (160, 160)), 0, 255).astype(np.uint8))]
    for words, frame in frames:
        problem = frame_problem(frame)
        assert problem is not None and problem.startswith("no part in view") and words in problem, (words, problem)
        d = decide(TEXTS, np.array([9.0, 0.0, -9.0]), np.zeros(3), PATCHES, Thresholds(), OOD,
                   frame_problem=problem)
        assert d.flagged and d.reasons[0] == problem
    cells = elpv.load_images(elpv.read_cells()[::40], 160)
    assert [frame_problem(cell) for cell in cells] == [None] * len(cells)


def test_a_station_gets_the_thresholds_derived_for_its_views():
    from appliance.decide import manifest_thresholds
    manifest = {"thresholds": {"p_best": 0.8, "ood_distance": 3.0, "image_reliance": 0.05,
                               "by_views": {"upright2": {"p_best": 0.9, "ood_distance": 3.0, "image_reliance": 0.05}}}}
    assert manifest_thresholds(manifest, "upright2")["p_best"] == 0.9
    assert manifest_thresholds(manifest, "one")["p_best"] == 0.8
    # a bundle from before per-views calibration: its one set serves every setting
    old = {"thresholds": {"p_best": 0.8, "ood_distance": 3.0, "image_reliance": 0.05}}
    assert manifest_thresholds(old, "upright2") == old["thresholds"]
    assert Thresholds.from_manifest(manifest_thresholds(manifest, "upright2"), p_best=0.7).p_best == 0.7


def test_a_flag_budget_takes_the_thresholds_derived_for_it_and_says_when_the_bundle_has_none():
    from appliance.decide import manifest_thresholds
    from models.errors import ModelError
    budgets = {"0.20": {"p_best": 0.55, "p_defect": 0.3, "val_flag_rate": 0.19, "val_defective_escape_rate": 0.1},
               "0.30": {"p_best": 0.6, "p_defect": 0.15, "val_flag_rate": 0.28, "val_defective_escape_rate": 0.07}}
    views = {"p_best": 0.9, "p_defect": 0.2, "ood_distance": 3.0, "image_reliance": 0.05, "budgets": budgets}
    manifest = {"version": 4, "thresholds": {"p_best": 0.8, "ood_distance": 3.0, "image_reliance": 0.05,
                                             "by_views": {"upright2": views}}}
    picked = manifest_thresholds(manifest, "upright2", 0.3)
    assert (picked["p_best"], picked["p_defect"], picked["ood_distance"]) == (0.6, 0.15, 3.0)
    assert manifest_thresholds(manifest, "upright2")["p_defect"] == 0.2          # no budget: the bundle's point
    t = Thresholds.from_manifest(manifest_thresholds(manifest, "upright2", 0.2), ood_distance=5.0)
    assert (t.p_best, t.p_defect, t.ood_distance) == (0.55, 0.3, 5.0)            # other overrides still apply
    with pytest.raises(ModelError, match="no thresholds for flag_budget 0.1: .* alone flag more .*one of 0.20, 0.30"):
        manifest_thresholds(manifest, "upright2", 0.1)
    none_fit = {"version": 4, "thresholds": {**views, "budgets": {}}}
    with pytest.raises(ModelError, match="alone flag more than that share; remove flag_budget"):
        manifest_thresholds(none_fit, "one", 0.2)
    # a budget whose best choice is no possible-defect check at all
    off = {"version": 4, "thresholds": {**views, "budgets": {"0.20": {**budgets["0.20"], "p_defect": None}}}}
    assert Thresholds.from_manifest(manifest_thresholds(off, "one", 0.2)).p_defect is None
    with pytest.raises(ModelError, match="no thresholds per flag budget.*remove flag_budget"):
        manifest_thresholds(manifest, "one", 0.2)                                 # a set without budgets
