"""Text-only preference pairs: specific, consistent chosen texts over flawed rejected ones."""
from pathlib import Path

import numpy as np

from training.data import synthetic as syn
from training.data import text_pairs as tp

HELDOUT_NO_DEFECT = {syn.NO_DEFECT_PHRASINGS[i] for i in syn.HELDOUT_NO_DEFECT_IDS}


def _heldout_texts():
    facts = [syn.DefectFacts(d, loc, s) for d in syn.DEFECT_TYPES for loc in syn.LOCATIONS for s in syn.SEVERITIES]
    return {syn.PHRASINGS[i].format(**vars(f)) for f in facts for i in syn.HELDOUT_PHRASING_IDS} | HELDOUT_NO_DEFECT


def test_pairs_are_deterministic_for_a_seed():
    assert tp.text_preference_pairs(np.random.default_rng(4), 50) == tp.text_preference_pairs(np.random.default_rng(4), 50)
    assert tp.text_preference_pairs(np.random.default_rng(4), 50) != tp.text_preference_pairs(np.random.default_rng(5), 50)


def test_pairs_are_well_formed():
    pairs = tp.text_preference_pairs(np.random.default_rng(0), 400)
    assert len(pairs) == 400
    for chosen, rejected in pairs:
        assert chosen.strip() and rejected.strip() and chosen != rejected


def test_chosen_is_specific_and_uses_training_phrasings_only():
    heldout = _heldout_texts()
    for chosen, rejected in tp.text_preference_pairs(np.random.default_rng(1), 400):
        assert chosen not in heldout
        assert not any(h in rejected for h in HELDOUT_NO_DEFECT)
        if chosen not in syn.NO_DEFECT_PHRASINGS:
            assert any(d in chosen for d in syn.DEFECT_TYPES)
            assert any(loc in chosen for loc in syn.LOCATIONS)
            assert any(s in chosen for s in syn.SEVERITIES)


def test_chosen_includes_some_no_defect_explanations():
    chosen = [c for c, _ in tp.text_preference_pairs(np.random.default_rng(2), 200)]
    assert 0 < sum(c in syn.NO_DEFECT_PHRASINGS for c in chosen) < len(chosen)


def test_each_rejection_kind_is_flawed():
    rng = np.random.default_rng(3)
    chosen = "the part shows a severe crack towards the upper left"
    for _ in range(30):
        assert tp.vague(chosen, rng) in tp.VAGUE
        contradiction = tp.contradictory(chosen, rng)
        assert any(p in contradiction for p in syn.NO_DEFECT_PHRASINGS)
        assert any(d in contradiction for d in syn.DEFECT_TYPES)
        incomplete = tp.incomplete(chosen, rng)
        named = [any(w in incomplete for w in pool) for pool in (syn.DEFECT_TYPES, syn.LOCATIONS, syn.SEVERITIES)]
        assert not all(named)
        assert tp.malformed(chosen, rng) != chosen


def test_validation_pairs_are_never_training_pairs():
    """The full recipe's sizes: about one in nine validation pairs used to repeat a training pair."""
    n_train, n_val = 2000, 200
    drawn = tp.text_preference_pairs(np.random.default_rng(3), n_train + n_val)
    assert set(drawn[n_train:]) & set(drawn[:n_train]), "the draw has no repeats: the check below checks nothing"
    train, val = tp.train_val_pairs(np.random.default_rng(3), n_train, n_val)
    assert train == drawn[:n_train]                      # the training pairs are as before
    assert len(val) == n_val and not set(val) & set(train)
    kept = [p for p in drawn[n_train:] if p not in set(train)]
    assert val[: len(kept)] == kept                      # the rest of validation is as before, topped up
    assert tp.train_val_pairs(np.random.default_rng(3), n_train, n_val) == (train, val)


def test_text_stage_data_keeps_training_pairs_out_of_validation():
    from training.config import load_config
    from training.train import build_data
    cfg = load_config(Path(__file__).resolve().parents[2] / "training" / "configs" / "tiny.yaml")
    data = build_data(cfg, cfg.teacher.image_size)
    train, val = data["text_train"][0].pairs, data["text_val"][0].pairs
    n = cfg.data.text_pairs
    assert train == tp.text_preference_pairs(np.random.default_rng(cfg.seed + 3), n + max(n // 10, 20))[:n]
    assert val and not set(val) & set(train)
