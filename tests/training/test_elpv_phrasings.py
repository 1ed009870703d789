"""Phrasings composed from the ELPV catalog's facts: each states the level and cell type it was
made for, they are varied, and they enter training only where the config asks for them."""
import re

import numpy as np
import yaml

from training.data import elpv_phrasings
from training.data.batches import elpv_set
from export.robustness import OUTSIDE_PHRASINGS, OUTSIDE_PHRASINGS_UNSEEN


def test_a_phrasing_states_its_level_and_cell_type_in_the_words_of_that_level():
    rng = np.random.default_rng(0)
    for level in range(4):
        for cell_type in ("mono", "poly"):
            texts = {elpv_phrasings.phrase(level, cell_type, rng) for _ in range(200)}
            assert len(texts) > 100                     # varied, not a handful of templates
            for text in texts:
                assert any(_says(text, v) for v in elpv_phrasings.VERDICTS[level]), text
                other = "poly" if cell_type == "mono" else "mono"
                assert not any(_says(text, n) for n in elpv_phrasings.TYPE_NAMES[other]), text


def _says(text: str, words: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(words.lower())}(?![\w-])", text.lower()) is not None


def test_training_texts_mix_in_phrasings_only_when_asked_and_never_in_evaluation():
    data = elpv_set("val", 64, limit=8)
    catalog_texts = {t for e in data.catalog.entries for t in (*e.texts, *e.heldout)}
    plain = [t for i in range(8) for t in data.texts(i, np.random.default_rng(i))]
    assert set(plain) <= catalog_texts
    data.use_phrasings(1.0, seed=0)
    mixed = [t for i in range(8) for t in data.texts(i, np.random.default_rng(i))]
    assert not set(mixed) & catalog_texts
    for heldout, display in ((True, False), (False, True)):
        assert set(data.texts(0, np.random.default_rng(0), heldout=heldout, display=display)) <= catalog_texts


def test_no_outside_phrasing_is_a_training_text():
    """The outside sets measure wording the model never trained on: none of their texts is a
    catalog training text, and none of the unseen set's is a text the generator can make. The
    first set's one-word texts ("good", "bad", "probably bad") can be generated: its author also
    wrote the generator, which is why the unseen set exists (elpv_phrasings' docstring)."""
    data = elpv_set("val", 64, limit=1)
    trained = {t.lower() for e in data.catalog.entries for t in e.texts}
    generated = {text.lower() for level in range(4) for t in ("mono", "poly")
                 for text in elpv_phrasings.every_phrasing(level, t)}
    for path in (OUTSIDE_PHRASINGS, OUTSIDE_PHRASINGS_UNSEEN):
        outside = {t.lower() for texts in yaml.safe_load(path.read_text())["entries"].values() for t in texts}
        assert not outside & trained, path
        if path == OUTSIDE_PHRASINGS_UNSEEN:
            assert not outside & generated, sorted(outside & generated)


def test_a_run_draws_from_a_fixed_pool_of_distinct_phrasings_per_entry():
    first, again = elpv_phrasings.pool(seed=3, per_entry=50), elpv_phrasings.pool(seed=3, per_entry=50)
    assert first == again and len(first) == 8
    assert all(len(set(texts)) == 50 for texts in first.values())
    data = elpv_set("val", 64, limit=8)
    data.use_phrasings(1.0, seed=3)
    for i in range(8):
        texts = data.texts(i, np.random.default_rng(i))
        for j, text in zip(data.order(i), texts):
            facts = data.catalog.entries[j].facts
            assert text in data.phrasing_pool[(round(facts["level"] * 3), facts["type"])]
