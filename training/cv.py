"""k-fold cross-validation of a training recipe, and the ablation table that compares recipes.

Val has 263 cells: one standard error of a binary accuracy there is about 2 points, so most
recipe changes cannot be told apart on it. `cross_validate` trains a config once per fold of a
stratified k-fold split of the whole train part (train + val; the test cells never enter,
elpv.cv_split) and reports each fold's figures of the kept epoch of the last stage, their mean
and standard deviation. Every fold is an ordinary run directory (out/fold-<k>), so an
interrupted cross-validation resumes where it stopped.

`ablation` reads several such directories and writes a markdown table and a plot: one row per
recipe, mean +- standard deviation over the folds, and each recipe against the first one paired
fold by fold (the folds are the same cells for every recipe: the differences between recipes
vary far less from fold to fold than the figures themselves do). Pair recipes trained on the same
CPU: a pairing across CPU flag sets is marked "another CPU" in the table.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.common import write_file_atomic
from models.errors import ConfigError
from training.config import TrainConfig

CV_FILE = "cv.json"
FIGURES = ("val_elpv_binary_accuracy", "val_level_head_binary_accuracy", "val_pairwise_accuracy",
           "val_level_head_auc", "val_level_head_log_loss")


def cross_validate(cfg: TrainConfig, out: str | Path, folds: int = 5, only: int | None = None) -> dict:
    """Train cfg on each fold (or only fold `only`) into out/fold-<k>; out/cv.json holds the
    folds finished so far and, once all are, their mean and standard deviation."""
    from training.train import train
    if not 2 <= folds <= 10:
        raise ConfigError(f"--folds must be from 2 to 10, got {folds}")
    if only is not None and not 0 <= only < folds:
        raise ConfigError(f"--fold must be from 0 to {folds - 1} (folds are numbered from 0), got {only}")
    out = Path(out)
    for k in ([only] if only is not None else range(folds)):
        if not _finished(out / f"fold-{k}", cfg):   # a finished fold keeps its summary (and its minutes)
            train(cfg, out / f"fold-{k}", fold=(k, folds))
    return summarize(cfg.name, cfg.hash(), out, folds)


def _finished(run: Path, cfg: TrainConfig) -> bool:
    path = run / "summary.json"
    return path.exists() and json.loads(path.read_text()).get("config_hash") == cfg.hash()


def summarize(name: str, config_hash: str, out: Path, folds: int) -> dict:
    per_fold = []
    for k in range(folds):
        path = out / f"fold-{k}" / "summary.json"
        if path.exists():
            per_fold.append({"fold": k, **final_figures(json.loads(path.read_text()))})
    result = {"config": name, "config_hash": config_hash, "folds": folds, "per_fold": per_fold}
    if len(per_fold) == folds:
        for key in FIGURES:
            values = [f[key] for f in per_fold if key in f]
            if len(values) == folds:
                result.setdefault("mean", {})[key] = float(np.mean(values))
                result.setdefault("sd", {})[key] = float(np.std(values, ddof=1))
    out.mkdir(parents=True, exist_ok=True)
    write_file_atomic(out / CV_FILE, (json.dumps(result, indent=2) + "\n").encode())
    return result


def final_figures(summary: dict) -> dict:
    """The validation figures of the kept epoch of a run's last stage (what the run hands on), its
    training minutes, and under "last_epoch" the figures of the stage's last epoch: the kept epoch
    is chosen on these very cells, so a longer stage has more chances at a lucky one."""
    last = summary["stages"][-1]
    final = last["history"][-1] if last.get("history") else {}
    return {"stage": last["stage"], "best_epoch": last["best_epoch"], "minutes": summary.get("minutes"),
            "isa": summary.get("platform", {}).get("isa"), **{k: last[k] for k in FIGURES if k in last},
            "last_epoch": {"epoch": final.get("epoch"), **{k: final[k] for k in FIGURES if k in final}}}


def ablation(cv_dirs: list[Path], out: Path) -> tuple[Path, Path]:
    """cv directories -> out/ablation.md (mean +- sd per recipe) and out/ablation.png."""
    rows = []
    for d in cv_dirs:
        path = Path(d) / CV_FILE
        if not path.exists():
            raise ConfigError(f"{d} has no {CV_FILE}: run `linejudge cv --config ... --out {d}` first")
        result = json.loads(path.read_text())
        if "mean" not in result:
            raise ConfigError(f"{d}: only {len(result['per_fold'])} of {result['folds']} folds are done; "
                              f"finish them with `linejudge cv` before comparing")
        rows.append((Path(d).name, result))
    out.mkdir(parents=True, exist_ok=True)
    return _write_table(rows, out / "ablation.md"), _plot(rows, out / "ablation.png")


def _cell(result: dict, key: str) -> str:
    if key not in result["mean"]:
        return "-"
    return f"{result['mean'][key]:.3f} +- {result['sd'][key]:.3f}"


def paired_difference(result: dict, reference: dict, key: str) -> dict | None:
    """result minus reference on the same folds: each fold's difference, their mean, its standard
    error, and on how many folds result is higher; None where the two were not run on the same folds."""
    mine = {f["fold"]: f.get(key) for f in result["per_fold"]}
    theirs = {f["fold"]: f.get(key) for f in reference["per_fold"]}
    if result["folds"] != reference["folds"] or mine.keys() != theirs.keys() or \
            None in mine.values() or None in theirs.values():
        return None
    diffs = np.array([mine[k] - theirs[k] for k in sorted(mine)])
    return {"mean": float(diffs.mean()), "se": float(diffs.std(ddof=1) / np.sqrt(len(diffs))),
            "higher": int((diffs > 0).sum()), "folds": len(diffs), "per_fold": diffs.tolist()}


def _paired_cell(result: dict, reference: dict, key: str) -> str:
    d = paired_difference(result, reference, key)
    if d is None:
        return "-"
    other_cpu = ", another CPU" if _isas(result) and _isas(reference) and _isas(result) != _isas(reference) else ""
    return f"{d['mean'] * 100:+.1f} +- {d['se'] * 100:.1f} ({d['higher']} of {d['folds']} folds higher{other_cpu})"


def _isas(result: dict) -> set[str]:
    """The CPU flag sets the folds were trained with (empty where a run did not record them). Torch
    rounds differently per ISA, and three epochs carry it on: the same recipe on another CPU moved
    single folds by up to 2.6 points (reports/ablation/README.md), so such a pairing is marked."""
    return {" ".join(f["isa"]) for f in result["per_fold"] if f.get("isa")}


def _write_table(rows, path: Path) -> Path:
    reference = rows[0][0]
    lines = ["| recipe | config | folds | ELPV binary (reward) | ELPV binary (level head) | pairwise | "
             f"reward binary - {reference}, points | level head binary - {reference}, points |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows:
        versus = [_paired_cell(r, rows[0][1], k) if name != reference else "(reference)" for k in FIGURES[:2]]
        lines.append(f"| {name} | {r['config']} ({r['config_hash']}) | {r['folds']} | "
                     f"{_cell(r, FIGURES[0])} | {_cell(r, FIGURES[1])} | {_cell(r, FIGURES[2])} | "
                     f"{versus[0]} | {versus[1]} |")
    path.write_text("\n".join(lines) + "\n\nmean +- standard deviation over the folds (val part of each fold); "
                    f"the last two columns: the recipe minus {reference} on the same folds, mean +- standard "
                    "error of the fold-by-fold differences.\n")
    return path


def _plot(rows, path: Path) -> Path:
    """Left: each recipe's folds and mean +- sd; right: each recipe minus the first, fold by fold."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, paired) = plt.subplots(1, 2, figsize=(11, 0.6 * len(rows) + 1.8), sharey=True)
    for i, (name, r) in enumerate(rows):
        values = [f[FIGURES[0]] for f in r["per_fold"]]
        ax.scatter(np.asarray(values) * 100, [i] * len(values), color="grey", s=14, zorder=2)
        ax.errorbar([r["mean"][FIGURES[0]] * 100], [i], xerr=[r["sd"][FIGURES[0]] * 100], fmt="o",
                    color="tab:blue", capsize=4, zorder=3)
        _plot_paired(paired, i, r, rows[0][1])
    ax.axvline(88.42, color="crimson", linestyle=":", label="Deitsch et al. 2019 (88.42 %)")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.set_xlabel("ELPV binary accuracy, % (each fold grey, mean +- sd blue)")
    ax.legend(loc="best", fontsize=8)
    paired.axvline(0, color="black", linewidth=0.8)
    paired.set_xlabel(f"minus {rows[0][0]} on the same fold, points (mean +- se)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_paired(ax, i: int, result: dict, reference: dict) -> None:
    d = paired_difference(result, reference, FIGURES[0])
    if d is None or result is reference:
        return
    ax.scatter(np.asarray(d["per_fold"]) * 100, [i] * d["folds"], color="grey", s=14, zorder=2)
    ax.errorbar([d["mean"] * 100], [i], xerr=[d["se"] * 100], fmt="o", color="tab:blue", capsize=4, zorder=3)
