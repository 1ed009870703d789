"""Does the shipped model fit its own training cells? (issue 18: escapes)

Scores the ELPV *train* cells (the ones the model learned from; test is not touched) with a
bundle's INT8 graphs, one view, and prints per expert level the share called defective; then
writes a contact sheet of 12 certainly-defective (level 3) train cells the model calls
defect-free and 12 it finds (p_defect printed on each, 300 px as the camera sees them).

    .venv/bin/python reports/experiments/misses/train_fit.py models/bundles/el-solar-default
"""
import sys
from pathlib import Path

import cv2
import numpy as np

from export.evaluate_bundle import bundle_catalog_rewards
from models.catalog import load_catalog
from training.data.batches import elpv_set

HERE = Path(__file__).parent


def p_defect(bundle: Path) -> tuple[np.ndarray, object]:
    rewards, data = bundle_catalog_rewards(bundle, "train")
    p = np.exp(rewards - rewards.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p[:, np.array(load_catalog(bundle / "catalog.yaml").defective, bool)].sum(1), data


def sheet(cells: np.ndarray, p: np.ndarray, images, types, rng) -> np.ndarray:
    tiles = []
    for i in rng.choice(cells, 12, replace=False):
        tile = cv2.cvtColor(images[i], cv2.COLOR_GRAY2BGR)
        cv2.putText(tile, f"p_defect {p[i]:.2f} {types[i]}", (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 255), 2)
        tiles.append(tile)
    return np.vstack([np.hstack(tiles[k:k + 4]) for k in range(0, 12, 4)])


def main(bundle: Path) -> None:
    p, data = p_defect(bundle)
    levels, defective = np.asarray(data.levels), np.asarray(data.levels) >= 2
    print(f"train cells {len(p)}: binary accuracy {((p >= 0.5) == defective).mean():.3f}")
    for level in range(4):
        sel = levels == level
        print(f"  level {level}/3: {sel.sum():4d} cells, called defective {(p[sel] >= 0.5).mean():.3f}")
    missed = np.where((levels == 3) & (p < 0.5))[0]
    found = np.where((levels == 3) & (p >= 0.9))[0]
    by_type = {t: int(sum(data.types[i] == t for i in missed)) for t in ("mono", "poly")}
    print(f"level-3 cells called defect-free: {len(missed)} ({by_type})")
    full = elpv_set("train", 300)      # the same cells at the camera's size
    rng = np.random.default_rng(0)
    cv2.imwrite(str(HERE / "train_level3_missed.png"), sheet(missed, p, full.images, full.types, rng))
    cv2.imwrite(str(HERE / "train_level3_found.png"), sheet(found, p, full.images, full.types, rng))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
