"""Exposure normalisation on the shipped v3 bundle without retraining (2026-12-07, fourth session).

Each val frame (and its camera variations) is scaled so that its 90th-percentile brightness lands
on the val cells' median 90th percentile before the bundle's INT8 graphs judge it (views upright2,
the station setting). Prints binary accuracy and verdict agreement under each variation, with and
without the normalisation. Run from the repository root (about 3 minutes on 2 cores):

    .venv/bin/python reports/experiments/exposure-untrained/exposure_eval.py
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from appliance.scoring.onnx_backend import OnnxBackend       # noqa: E402
from export import verify                                    # noqa: E402
from export.decide_stats import catalog_defective            # noqa: E402
from export.evaluate_bundle import eval_sets                 # noqa: E402
from export.robustness import CAMERA_VARIATIONS              # noqa: E402
from models.catalog import load_catalog                      # noqa: E402
from models.preprocess import PreprocessSpec, TextTokenizer  # noqa: E402
from training.metrics import elpv_metrics                    # noqa: E402

BUNDLE = Path("models/bundles/el-solar-default")
VIEWS = "upright2"


def main() -> None:
    manifest = json.loads((BUNDLE / "manifest.json").read_text())
    spec = PreprocessSpec.from_dict(manifest["preprocessing"])
    tokenizer = TextTokenizer(BUNDLE / "tokenizer.json", spec.max_tokens)
    data, _ = eval_sets("val", spec.image_size, None, 0)
    catalog = load_catalog(BUNDLE / "catalog.yaml")
    defective = catalog_defective(catalog)
    backend = OnnxBackend(BUNDLE, int8=True)
    reference = float(np.median([np.percentile(g, 90) for g in data.images]))

    def white_point(g):
        return np.clip(g.astype(np.float32) * reference / max(float(np.percentile(g, 90)), 1.0), 0, 255).astype(np.uint8)

    for name, prepare in (("as the camera sends them", lambda g: g), ("normalised", white_point)):
        frames = np.stack([prepare(g) for g in data.images])
        _, base = verify.backend_outputs(backend, tokenizer, spec, frames, catalog.displays, views=VIEWS)
        out = {"binary": round(elpv_metrics(base, data)[0]["elpv_binary_accuracy"], 4)}
        for variation in ("brighter", "darker", "out_of_focus", "jpeg_q40"):
            changed = np.stack([prepare(np.ascontiguousarray(CAMERA_VARIATIONS[variation](g))) for g in data.images])
            _, rewards = verify.backend_outputs(backend, tokenizer, spec, changed, catalog.displays, views=VIEWS)
            out[variation] = round(float((defective[rewards.argmax(1)] == defective[base.argmax(1)]).mean()), 4)
        print(name, out, flush=True)


if __name__ == "__main__":
    main()
