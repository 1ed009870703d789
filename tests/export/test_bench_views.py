"""`linejudge bench` times a station's `views` setting by computing what the appliance computes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from export import verify
from export.bench import _onnx_runner, _texts
from models.preprocess import PreprocessSpec, TextTokenizer
from training.data import elpv

BUNDLE = Path(__file__).resolve().parents[2] / "models" / "bundles" / "el-solar-default"


def test_the_timed_views_call_gives_the_evals_view_averaged_rewards():
    make, _, backend = _onnx_runner(BUNDLE, 1, int8=True)
    spec = PreprocessSpec.from_dict(json.loads((BUNDLE / "manifest.json").read_text())["preprocessing"])
    cell = np.ascontiguousarray(np.rot90(elpv.load_images(elpv.read_cells()[7:8], spec.image_size)[0]))
    timed = make(16, cell, views="upright2")()
    tokenizer = TextTokenizer(BUNDLE / "tokenizer.json", spec.max_tokens)
    _, expected = verify.backend_outputs(backend, tokenizer, spec, cell[None], _texts(16), views="upright2")
    np.testing.assert_allclose(timed, expected[0], atol=1e-4)
    assert not np.allclose(make(16, cell)(), timed, atol=1e-3), "the views setting was not applied"
