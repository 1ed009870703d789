"""Is a longer classify stage better? classify-224-20ep against classify-224-10ep, paired fold by
fold, on the folds both have finished (the rule, written in classify-224-20ep.yaml before any
fold ran, needs all five; a partial comparison is printed as such).

    .venv/bin/python reports/ablation/classify_length.py [runs/cv] > reports/ablation/classify-length.md

Figures at the kept epoch (chosen on val) and at the last epoch; the level head's binary
accuracy, AUC and log-loss, and the reward's binary accuracy.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from training.cv import final_figures, paired_difference  # noqa: E402

SHORT, LONG = "classify-224-10ep", "classify-224-20ep"
FIGURES = {"val_level_head_auc": "level head AUC", "val_level_head_log_loss": "level head log-loss",
           "val_level_head_binary_accuracy": "level head binary", "val_elpv_binary_accuracy": "reward binary"}


def folds(cv_dir: Path) -> dict[int, dict]:
    out = {}
    for path in sorted(cv_dir.glob("fold-*/summary.json")):
        out[int(path.parent.name.split("-")[1])] = final_figures(json.loads(path.read_text()))
    return out


def paired(short: dict, long: dict, key: str, last: bool) -> np.ndarray:
    """long minus short, fold by fold, on the folds both have (training.cv.paired_difference)."""
    def as_cv(runs: dict) -> dict:
        return {"folds": 5, "per_fold": [{"fold": k, key: (runs[k]["last_epoch"] if last else runs[k]).get(key)}
                                         for k in sorted(short.keys() & long.keys())]}
    return np.array(paired_difference(as_cv(long), as_cv(short), key)["per_fold"])


def main(cv_root: Path) -> None:
    short, long = folds(cv_root / SHORT), folds(cv_root / LONG)
    both = sorted(short.keys() & long.keys())
    print(f"# {LONG} minus {SHORT}, paired on folds {both} ({len(both)} of 5)\n")
    print("| figure | epoch | per fold | mean | folds where 20 epochs is better |\n|---|---|---|---|---|")
    for key, label in FIGURES.items():
        for last in (False, True):
            d = paired(short, long, key, last)
            better = int((d < 0).sum() if "log_loss" in key else (d > 0).sum())
            scale = 1 if "log_loss" in key or "auc" in key else 100
            digits = 4 if scale == 1 else 2
            print(f"| {label} | {'last' if last else 'kept'} | {' '.join(f'{x * scale:+.{digits}f}' for x in d)} | "
                  f"{d.mean() * scale:+.{digits}f} | {better} of {len(d)} |")
    print("\nAccuracies in points, AUC and log-loss as they are (lower log-loss is better).")
    for name, runs in ((SHORT, short), (LONG, long)):
        print(f"\n{name}: " + ", ".join(f"fold {k}: {runs[k]['minutes']} min, kept epoch {runs[k]['best_epoch']}"
                                         for k in sorted(runs)))
    if len(both) < 5:
        print(f"\nThe rule needs all five folds; {len(both)} are paired so far. No decision yet.")
        return
    auc, loss = paired(short, long, "val_level_head_auc", False), paired(short, long, "val_level_head_log_loss", False)
    binary = [paired(short, long, "val_level_head_binary_accuracy", last).mean() for last in (False, True)]
    adopt = (auc > 0).sum() >= 4 and loss.mean() < 0 and min(binary) >= 0
    print(f"\nRule: AUC higher in {(auc > 0).sum()} of 5 (>= 4), mean log-loss {loss.mean():+.4f} (< 0), "
          f"binary kept {binary[0] * 100:+.2f} / last {binary[1] * 100:+.2f} points (>= 0): "
          f"{'adopt 20 epochs' if adopt else 'keep 10 epochs'}.")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "cv")
