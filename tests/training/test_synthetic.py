"""Synthetic defects: placement in the named 3x3 cell, severity, hard negatives, phrasings."""
import numpy as np
import pytest

from training.data import synthetic as syn
from training.data.synthetic import DefectFacts, NO_DEFECT

SIZE = 160


def _diff(facts, seed, size=SIZE):
    rng = np.random.default_rng(seed)
    image = syn.procedural_texture(rng, size)
    return np.abs(syn.render_defect(image, facts, rng).astype(np.float64) - image)


def _changed_facts(a: DefectFacts, b: DefectFacts) -> int:
    """How many facts differ; defect <-> no defect counts as one."""
    if (a.defect is None) != (b.defect is None):
        return 1
    return (a.defect != b.defect) + (a.location != b.location) + (a.severity != b.severity)


def test_render_sample_is_deterministic_for_a_seed():
    image_a, facts_a = syn.render_sample(np.random.default_rng(7))
    image_b, facts_b = syn.render_sample(np.random.default_rng(7))
    assert facts_a == facts_b and np.array_equal(image_a, image_b)
    assert image_a.shape == (SIZE, SIZE) and image_a.dtype == np.uint8


def test_procedural_textures_vary():
    rng = np.random.default_rng(0)
    textures = [syn.procedural_texture(rng, 64) for _ in range(6)]
    assert all(t.shape == (64, 64) and t.dtype == np.uint8 for t in textures)
    assert len({round(float(t.mean())) for t in textures}) > 1


@pytest.mark.parametrize("location", syn.LOCATIONS)
def test_defect_is_drawn_inside_its_cell(location):
    x, y, w, h = syn.cell_box(location, SIZE)
    for seed, defect in enumerate(syn.DEFECT_TYPES):
        for severity in syn.SEVERITIES:
            diff = _diff(DefectFacts(defect, location, severity), seed)
            assert diff.sum() > 0, (defect, severity)
            assert diff[y:y + h, x:x + w].sum() / diff.sum() > 0.7, (defect, severity)


def test_cells_tile_the_frame_row_major():
    boxes = [syn.cell_box(loc, 100) for loc in syn.LOCATIONS]
    assert boxes[0][:2] == (0, 0) and boxes[2][1] == 0 and boxes[6][0] == 0
    assert sum(w * h for _, _, w, h in boxes) == 100 * 100


@pytest.mark.parametrize("defect", syn.DEFECT_TYPES)
def test_severe_changes_more_pixels_than_minor(defect):
    def changed_pixels(severity):
        return np.mean([(_diff(DefectFacts(defect, loc, severity), seed) > 8).sum()
                        for seed, loc in enumerate(syn.LOCATIONS)])
    assert changed_pixels("severe") > 1.3 * changed_pixels("minor")


def test_no_defect_leaves_the_image_unchanged():
    assert _diff(NO_DEFECT, 0).sum() == 0


def test_background_is_resized_and_used():
    background = np.full((300, 300), 200, np.uint8)
    for bg in (background, np.dstack([background] * 3)):
        image, facts = syn.render_sample(np.random.default_rng(1), size=96, background=bg)
        assert image.shape == (96, 96) and image.dtype == np.uint8
        assert np.median(image) == 200


def test_sample_facts_respects_no_defect_probability():
    rng = np.random.default_rng(0)
    assert all(syn.sample_facts(rng, p_no_defect=0.0).defect for _ in range(50))
    assert all(syn.sample_facts(rng, p_no_defect=1.0) == NO_DEFECT for _ in range(10))
    facts = syn.sample_facts(rng, p_no_defect=0.0)
    assert facts.defect in syn.DEFECT_TYPES and facts.location in syn.LOCATIONS and facts.severity in syn.SEVERITIES


def test_hard_negatives_differ_in_exactly_one_fact():
    rng = np.random.default_rng(3)
    truths = [NO_DEFECT] + [syn.sample_facts(rng, p_no_defect=0.0) for _ in range(60)]
    for truth in truths:
        for k in (1, 3, 4, 6):
            negatives = syn.hard_negatives(truth, rng, k=k)
            assert len(negatives) == k and len(set(negatives)) == k
            assert truth not in negatives
            assert all(_changed_facts(truth, n) == 1 for n in negatives), (truth, negatives)
            if truth == NO_DEFECT:
                assert all(n.defect is not None for n in negatives)


def test_four_hard_negatives_cover_every_kind_of_change():
    truth = DefectFacts("crack", "center", "minor")
    negatives = syn.hard_negatives(truth, np.random.default_rng(0), k=4)
    assert NO_DEFECT in negatives
    assert {n.defect for n in negatives} - {truth.defect, None}
    assert {n.location for n in negatives} - {truth.location, None}
    assert {n.severity for n in negatives} - {truth.severity, None}


def test_hard_negatives_are_deterministic_and_bounded():
    truth = DefectFacts("dent", "lower right", "severe")
    assert syn.hard_negatives(truth, np.random.default_rng(5)) == syn.hard_negatives(truth, np.random.default_rng(5))
    with pytest.raises(ValueError):
        syn.hard_negatives(truth, np.random.default_rng(0), k=17)   # 5 types + 8 places + 2 severities + none


def test_phrasing_pools_and_heldout_ids():
    assert len(syn.PHRASINGS) >= 10 and len(syn.NO_DEFECT_PHRASINGS) >= 5
    assert 2 <= len(syn.HELDOUT_PHRASING_IDS) <= 3 and len(syn.HELDOUT_NO_DEFECT_IDS) == 1
    assert syn.HELDOUT_PHRASING_IDS <= set(range(len(syn.PHRASINGS)))
    assert syn.HELDOUT_NO_DEFECT_IDS <= set(range(len(syn.NO_DEFECT_PHRASINGS)))
    assert all(all(f in t for f in ("{defect}", "{location}", "{severity}")) for t in syn.PHRASINGS)


@pytest.mark.parametrize("facts", [DefectFacts("pit", "upper right", "moderate"), NO_DEFECT])
def test_heldout_and_training_phrasings_are_disjoint(facts):
    rng = np.random.default_rng(0)
    seen = {syn.describe(facts, rng) for _ in range(200)}
    heldout = {syn.describe(facts, rng, heldout=True) for _ in range(100)}
    assert seen.isdisjoint(heldout)
    templates, held = ((syn.NO_DEFECT_PHRASINGS, syn.HELDOUT_NO_DEFECT_IDS) if facts == NO_DEFECT
                       else (syn.PHRASINGS, syn.HELDOUT_PHRASING_IDS))
    assert len(seen) == len(templates) - len(held) and len(heldout) == len(held)


def test_description_names_every_fact():
    facts = DefectFacts("burn", "middle left", "severe")
    rng = np.random.default_rng(0)
    for heldout in (False, True):
        text = syn.describe(facts, rng, heldout=heldout)
        assert "burn" in text and "middle left" in text and "severe" in text


def test_changed_fact_names_the_one_fact_a_hard_negative_changes():
    truth = DefectFacts("crack", "upper left", "severe")
    rng = np.random.default_rng(3)
    kinds = {syn.changed_fact(truth, n) for n in syn.hard_negatives(truth, rng, k=4)}
    assert kinds == {"presence", "type", "location", "severity"}         # k=4 takes each kind once
    assert syn.changed_fact(NO_DEFECT, truth) == "presence"


def test_sixteen_negatives_are_every_one_fact_change_of_a_defect():
    facts = DefectFacts("crack", "center", "minor")
    negatives = syn.hard_negatives(facts, np.random.default_rng(0), k=16)
    assert sorted(negatives, key=str) == sorted([n for group in syn.one_fact_changes(facts) for n in group], key=str)
    kinds = [syn.changed_fact(facts, n) for n in negatives]
    assert {k: kinds.count(k) for k in syn.FACT_KINDS} == {"presence": 1, "type": 5, "location": 8, "severity": 2}


def test_eight_negatives_take_the_kinds_of_change_in_turn():
    facts = DefectFacts("stain", "upper left", "severe")
    kinds = [syn.changed_fact(facts, n) for n in syn.hard_negatives(facts, np.random.default_rng(3), k=8)]
    assert set(kinds) == set(syn.FACT_KINDS) and max(kinds.count(k) for k in kinds) <= 3


def test_fact_labels_are_class_ids_with_zero_for_no_defect():
    assert syn.fact_labels(NO_DEFECT) == (0, 0, 0)
    t, loc, sev = syn.fact_labels(DefectFacts("dent", "lower right", "severe"))
    assert (syn.DEFECT_TYPES[t - 1], syn.LOCATIONS[loc - 1], syn.SEVERITIES[sev - 1]) == ("dent", "lower right", "severe")
    assert syn.FACT_CLASSES == (1 + len(syn.DEFECT_TYPES), 1 + len(syn.LOCATIONS), 1 + len(syn.SEVERITIES))
