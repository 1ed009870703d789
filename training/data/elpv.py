"""ELPV electroluminescence solar-cell images (PyPI elpv-dataset) and their fixed split.

Split: one seeded split stratified by defect level x cell type, 75 % train / 25 % test as in
Deitsch et al.; validation (10 % of the cells) is carved out of the train part. The split
is written to training/data/elpv_split.json (committed) and the test part is never used for
training, early stopping or tuning: `load_split_images` refuses to hand test cells to a
training caller.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

SPLIT_FILE = Path(__file__).with_name("elpv_split.json")
SPLIT_SEED = 20190101
LEVELS = (0.0, 1 / 3, 2 / 3, 1.0)


@dataclass(frozen=True)
class ElpvCell:
    id: str           # e.g. "cell0001"
    path: Path
    level: int        # index into LEVELS (0..3)
    cell_type: str    # "mono" | "poly"

    @property
    def defective(self) -> bool:
        return LEVELS[self.level] >= 0.5


def elpv_root() -> Path:
    import elpv_dataset
    return Path(elpv_dataset.__file__).resolve().parent / "data"


def read_cells() -> list[ElpvCell]:
    root = elpv_root()
    cells = []
    for line in (root / "labels.csv").read_text().splitlines():
        if not line.strip():
            continue
        rel, prob, cell_type = line.split()
        level = int(round(float(prob) * 3))
        cells.append(ElpvCell(Path(rel).stem, root / rel, level, cell_type))
    return cells


def _shuffled_strata(cells: list[ElpvCell], rng: np.random.Generator):
    """Each defect level x cell type stratum's cell ids, in a fixed order, seeded-shuffled."""
    strata: dict[tuple, list[str]] = {}
    for cell in cells:
        strata.setdefault((cell.level, cell.cell_type), []).append(cell.id)
    for key in sorted(strata):
        ids = sorted(strata[key])
        rng.shuffle(ids)
        yield ids


def make_split(cells: list[ElpvCell], seed: int = SPLIT_SEED, test_fraction: float = 0.25,
               val_fraction: float = 0.10) -> dict[str, list[str]]:
    split = {"train": [], "val": [], "test": []}
    for ids in _shuffled_strata(cells, np.random.default_rng(seed)):
        n_test = round(len(ids) * test_fraction)
        n_val = round(len(ids) * val_fraction)
        split["test"] += ids[:n_test]
        split["val"] += ids[n_test:n_test + n_val]
        split["train"] += ids[n_test + n_val:]
    return {k: sorted(v) for k, v in split.items()}


def load_split() -> dict[str, list[str]]:
    """The committed split; written on first use from the seeded recipe."""
    if not SPLIT_FILE.exists():
        split = make_split(read_cells())
        SPLIT_FILE.write_text(json.dumps({"seed": SPLIT_SEED, **split}, indent=1) + "\n")
    data = json.loads(SPLIT_FILE.read_text())
    return {k: data[k] for k in ("train", "val", "test")}


def cv_split(fold: int, folds: int) -> dict[str, list[str]]:
    """Cross-validation over the train part (train + val, never test): the cells are dealt into
    `folds` folds stratified by defect level x cell type; fold `fold` is "val", the others "train"."""
    split = load_split()
    pool = set(split["train"]) | set(split["val"])
    out = {"train": [], "val": []}
    for ids in _shuffled_strata([c for c in read_cells() if c.id in pool], np.random.default_rng(SPLIT_SEED + folds)):
        for i, cell_id in enumerate(ids):
            out["val" if i % folds == fold else "train"].append(cell_id)
    return {k: sorted(v) for k, v in out.items()}


def cells_for(part: str, limit: int | None = None, seed: int = 0,
              fold: tuple[int, int] | None = None) -> list[ElpvCell]:
    """Cells of one split part; `limit` keeps a stratified-ish random subset (tiny runs);
    `fold` (k, folds) takes "train"/"val" from the cross-validation split instead (cv_split)."""
    if fold is not None and part not in ("train", "val"):
        raise ValueError(f"cross-validation folds have train and val parts only, not {part!r}")
    ids = set(cv_split(*fold)[part] if fold is not None else load_split()[part])
    cells = [c for c in read_cells() if c.id in ids]
    if limit is not None and limit < len(cells):
        order = np.random.default_rng(seed).permutation(len(cells))[:limit]
        cells = [cells[i] for i in sorted(order)]
    return cells


def load_images(cells: list[ElpvCell], size: int) -> np.ndarray:
    """(N, size, size) uint8 grayscale, resized with INTER_AREA like the appliance."""
    from models.preprocess import resize_gray
    out = np.empty((len(cells), size, size), np.uint8)
    for i, cell in enumerate(cells):
        image = cv2.imread(str(cell.path), cv2.IMREAD_GRAYSCALE)
        out[i] = resize_gray(image, size)
    return out


def defect_free_backgrounds(size: int, limit: int = 200, fold: tuple[int, int] | None = None) -> np.ndarray:
    """Defect-free train cells, backgrounds for synthetic defects (never test or val cells)."""
    cells = [c for c in cells_for("train", fold=fold) if c.level == 0][:limit]
    return load_images(cells, size)
