"""Cross-validation folds and the ablation table (training/cv.py)."""
import json
import shutil
from collections import Counter

import pytest

from models.errors import ConfigError
from training.config import config_from_dict
from training.cv import ablation, cross_validate
from training.data import elpv
import yaml

from micro import MICRO_MODELS


def test_folds_partition_train_and_val_stratified_and_never_touch_test():
    split = elpv.load_split()
    pool = set(split["train"]) | set(split["val"])
    folds = [elpv.cv_split(k, 5) for k in range(5)]
    vals = [set(f["val"]) for f in folds]
    assert set().union(*vals) == pool
    assert sum(len(v) for v in vals) == len(pool)                    # disjoint
    for f in folds:
        assert set(f["train"]) | set(f["val"]) == pool and not set(f["train"]) & set(f["val"])
        assert not (set(f["train"]) | set(f["val"])) & set(split["test"])
    strata = {c.id: (c.level, c.cell_type) for c in elpv.read_cells()}
    counts = [Counter(strata[i] for i in v) for v in vals]
    for key in set(strata[i] for i in pool):
        sizes = [c[key] for c in counts]
        assert max(sizes) - min(sizes) <= 1, (key, sizes)              # each stratum dealt evenly
    assert elpv.cv_split(0, 5) == folds[0]                             # the same split every time
    with pytest.raises(ValueError, match="train and val parts only"):
        elpv.cells_for("test", fold=(0, 5))


MICRO_CV = MICRO_MODELS.replace("frozen_blocks: 12}", "frozen_blocks: 12, level_weight: 1.0}") + """\
data: {elpv_train_limit: 16, elpv_val_limit: 8, synthetic_train: 0, synthetic_val: 0, text_pairs: 32}
stages:
  - {name: text, epochs: 1, lr: 0.003, batch_size: 8}
  - {name: classify, epochs: 1, lr: 0.003, batch_size: 8, select: level_head}
"""


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory):
    cfg = config_from_dict(yaml.safe_load(MICRO_CV), name="micro-cv")
    out = tmp_path_factory.mktemp("cv") / "micro-cv"
    return cfg, out, cross_validate(cfg, out, folds=2)


def test_each_fold_trains_on_the_others_and_validates_on_its_own(cv_run):
    cfg, out, result = cv_run
    assert [f["fold"] for f in result["per_fold"]] == [0, 1]
    for k in (0, 1):
        split = elpv.cv_split(k, 2)
        used = set(json.loads((out / f"fold-{k}" / "train_ids.json").read_text())["elpv_ids"])
        assert used <= set(split["train"]) | set(split["val"])
        assert used & set(split["val"]) and used & set(split["train"])
        summary = json.loads((out / f"fold-{k}" / "summary.json").read_text())
        assert summary["cv_fold"] == [k, 2]
    values = [f["val_level_head_binary_accuracy"] for f in result["per_fold"]]
    assert result["mean"]["val_level_head_binary_accuracy"] == pytest.approx(sum(values) / 2)
    losses = [f["val_level_head_log_loss"] for f in result["per_fold"]]   # the figures finer than one cell
    assert all(loss > 0 for loss in losses) and "val_level_head_auc" in result["per_fold"][0]
    assert result["mean"]["val_level_head_log_loss"] == pytest.approx(sum(losses) / 2)
    last = result["per_fold"][0]["last_epoch"]       # one epoch: the last epoch is the kept one
    assert last["epoch"] == 1 and last["val_level_head_log_loss"] == result["per_fold"][0]["val_level_head_log_loss"]
    assert json.loads((out / "cv.json").read_text()) == result


def test_a_finished_cross_validation_is_not_trained_again(cv_run):
    cfg, out, result = cv_run
    stamp = (out / "fold-1" / "classify" / "done.json").stat().st_mtime_ns
    assert cross_validate(cfg, out, folds=2, only=1) == result
    assert (out / "fold-1" / "classify" / "done.json").stat().st_mtime_ns == stamp


def test_ablation_table_and_plot_compare_recipes(cv_run, tmp_path):
    _, out, result = cv_run
    other = tmp_path / "other-recipe"
    shutil.copytree(out, other)
    table, plot = ablation([out, other], tmp_path / "report")
    text = table.read_text()
    mean, sd = result["mean"]["val_elpv_binary_accuracy"], result["sd"]["val_elpv_binary_accuracy"]
    assert f"| micro-cv | micro-cv ({result['config_hash']}) | 2 | {mean:.3f} +- {sd:.3f}" in text
    assert "| other-recipe |" in text
    assert plot.stat().st_size > 1000


def test_unfinished_or_missing_runs_are_refused_with_what_to_do(cv_run, tmp_path):
    _, out, _ = cv_run
    with pytest.raises(ConfigError, match="run `linejudge cv"):
        ablation([tmp_path / "nothing"], tmp_path / "report")
    half = tmp_path / "half"
    shutil.copytree(out, half)
    data = json.loads((half / "cv.json").read_text())
    data["per_fold"] = data["per_fold"][:1]
    del data["mean"]
    (half / "cv.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="only 1 of 2 folds"):
        ablation([half], tmp_path / "report")
    with pytest.raises(ConfigError, match="--fold must be from 0 to 1"):
        cross_validate(cv_run[0], tmp_path / "x", folds=2, only=2)


def _cv_dir(root, name, binaries, isa=None):
    per_fold = [{"fold": k, "val_elpv_binary_accuracy": b, "val_level_head_binary_accuracy": b,
                 "val_pairwise_accuracy": 0.8, "isa": isa} for k, b in enumerate(binaries)]
    result = {"config": name, "config_hash": "0" * 16, "folds": len(binaries), "per_fold": per_fold,
              "mean": {k: sum(f[k] for f in per_fold) / len(per_fold) for k in per_fold[0] if k.startswith("val")},
              "sd": {k: 0.01 for k in per_fold[0] if k.startswith("val")}}
    (root / name).mkdir()
    (root / name / "cv.json").write_text(json.dumps(result))
    return root / name


def test_each_recipe_is_compared_with_the_first_fold_by_fold(tmp_path):
    from training.cv import paired_difference
    base = _cv_dir(tmp_path, "base", [0.84, 0.86, 0.88, 0.85, 0.87])
    better = _cv_dir(tmp_path, "better", [0.86, 0.87, 0.90, 0.86, 0.87])      # +2, +1, +2, +1, 0 points
    fewer = _cv_dir(tmp_path, "three-folds", [0.9, 0.9, 0.9])
    d = paired_difference(json.loads((better / "cv.json").read_text()),
                          json.loads((base / "cv.json").read_text()), "val_elpv_binary_accuracy")
    assert d["mean"] == pytest.approx(0.012) and d["higher"] == 4 and d["folds"] == 5
    assert d["se"] == pytest.approx(0.008366600 / 5 ** 0.5)
    text = ablation([base, better, fewer], tmp_path / "report")[0].read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert rows["better"].endswith("| +1.2 +- 0.4 (4 of 5 folds higher) | +1.2 +- 0.4 (4 of 5 folds higher) |")
    assert rows["base"].endswith("| (reference) | (reference) |")
    assert rows["three-folds"].endswith("| - | - |")                          # other folds: no pairing


def test_a_pairing_across_cpus_is_marked_in_the_table(tmp_path, cv_run):
    base = _cv_dir(tmp_path, "base", [0.84, 0.86], isa=["avx2"])
    same = _cv_dir(tmp_path, "same-cpu", [0.85, 0.87], isa=["avx2"])
    other = _cv_dir(tmp_path, "vnni-cpu", [0.85, 0.87], isa=["avx2", "avx512_vnni", "avx512f"])
    text = ablation([base, same, other], tmp_path / "report")[0].read_text()
    assert "| +1.0 +- 0.0 (2 of 2 folds higher) |" in text
    assert "| +1.0 +- 0.0 (2 of 2 folds higher, another CPU) |" in text
    _, out, result = cv_run                                    # a real run records its CPU flags
    summary = json.loads((out / "fold-0" / "summary.json").read_text())
    from models.platform import cpu_flags, cpu_model
    assert summary["platform"]["isa"] == cpu_flags() and summary["platform"]["cpu"] == cpu_model()
    assert result["per_fold"][0]["isa"] == summary["platform"]["isa"]


def test_defect_auc_ranks_defective_cells_above_functional_ones():
    import numpy as np
    from training.evaluate import defect_auc
    truth = np.array([True, True, False, False])
    assert defect_auc(np.array([0.9, 0.8, 0.2, 0.1]), truth) == 1.0
    assert defect_auc(np.array([0.1, 0.2, 0.8, 0.9]), truth) == 0.0
    assert defect_auc(np.array([0.9, 0.3, 0.5, 0.1]), truth) == 0.75   # one of four pairs out of order
    assert defect_auc(np.full(4, 0.5), truth) == 0.5                    # ties count half
    assert np.isnan(defect_auc(np.array([0.9, 0.8]), np.array([True, True])))
