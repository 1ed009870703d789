"""`linejudge hq retrain`: operator reviews from the fleet -> a better, signed model bundle.

    1. fleet data   preference pairs the appliances synced (frame + chosen + rejected), split
                    by inspection into train and held-out reviews (held-out never trains)
    2. fleet stage  the current teacher continues on the fleet pairs, oversampled, mixed with
                    replay of its base data; the multimodal loss with shortcut-aware weights
    3. distill      the current student re-distils from the new teacher on the same mix
    4. gate         new vs current student: ELPV val pairwise accuracy and the golden frames
                    may not drop more than `gate_points`; held-out fleet reviews must improve
    5. publish      export (parity + INT8 gate), sign, publish to HQ; lineage lists the
                    feedback that trained it. A failed gate publishes nothing.

Skipped fleet records (counted in the report): frames that are ELPV test cells (the test split
never trains anything) and pairs with an empty or overlong explanation. The run directory records
its fleet inputs (fleet_inputs.json: base run, --fleet-repeat, feedback ids); an interrupted run
resumes with the reviews it started with (newer ones wait for the next retrain), and is refused if
its base or --fleet-repeat changed or one of its reviews is gone. --base is a `linejudge train` run or a previous `hq retrain` run.

Not done here: pseudo-preferences for unreviewed flagged frames (MM-UPT majority vote). The
appliances upload frames only with reviews, so HQ has no unreviewed frames to vote on yet.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.common import is_whole
from models.errors import BadExplanation, ConfigError, LinejudgeError
from models.preprocess import check_explanation, read_image, resize_gray
from models import bundle as bundle_lib
from models.reward_model import RewardModel, load_model
from training.config import FLEET_STAGES, TrainConfig
from training.data import elpv
from training.data.batches import CandidateSet, el_catalog, entry_index
from training.hq.publish import bundle_dir_of, latest_bundle, publish_bundle
from training.hq.state import HQState, feedback_records, open_state
from training.stages import Encoder, pairwise_accuracy, run_stage
from training.train import (claim_run_dir, build_data, check_no_test_cells, elpv_val_figures, preprocess_spec,
                            seed_everything)


FLEET_INPUTS = "fleet_inputs.json"


class RetrainError(LinejudgeError):
    """Fleet retraining cannot run or did not pass its gate."""


# (run_dir, bundle_dir, export settings) -> the signed bundle in bundle_dir. Supplied by the
# caller (export/ stands above training/): export.build_bundle.export_with_settings.
ExportBundle = Callable[[Path, Path, dict], object]


@dataclass(frozen=True)
class RetrainOptions:
    hq_state: "HQState | Path"    # a directory means SQLite in it
    base_run: Path                    # run dir holding multimodal/ or fleet/ {model,proxy} and distill/model
    out: Path
    line: str = "el-solar"
    key: Path | None = None           # sign + publish when given
    key_id: str | None = None
    heldout_fraction: float = 0.2
    fleet_repeat: int = 8             # each fleet pair is seen this many times per epoch
    gate_points: float = 0.5
    export_val_limit: int | None = None
    calibration_frames: int = 320
    int8_gate: tuple[tuple[str, float], ...] = ()   # exporter gate overrides, e.g. (("gate_top1", 0.0),); () = its defaults


# ------------------------------------------------------------------ 1. fleet data
@dataclass
class FleetSet(CandidateSet):
    """One operator preference per item: (frame, chosen, rejected), repeated `repeat` times."""
    pairs: list = None
    repeat: int = 1
    flippable = False                 # the explanation may name a location

    def __len__(self) -> int:
        return len(self.pairs) * self.repeat

    def texts(self, i, rng, heldout=False, display=False):
        pair = self.pairs[i % len(self.pairs)]
        return [pair["chosen"], pair["rejected"]]


def fleet_pairs(hq_state: "HQState | Path") -> list[dict]:
    """Preference records with an uploaded frame, as {key, inspection, chosen, rejected, frame_file}."""
    out = []
    for rec in feedback_records(hq_state, kind="preference"):
        p = rec["payload"]
        if rec["frame_file"]:
            out.append({"key": f"{rec['appliance_id']}/{rec['idempotency_key']}",
                        "inspection": f"{rec['appliance_id']}/{p.get('inspection_id')}",
                        "chosen": p.get("chosen"), "rejected": p.get("rejected"), "frame_file": rec["frame_file"]})
    return out


def elpv_test_hashes() -> set[str]:
    """sha256 of every ELPV test cell's file: a frame with one of these is a test cell."""
    test_ids = set(elpv.load_split()["test"])
    return {bundle_lib.file_sha256(c.path) for c in elpv.read_cells() if c.id in test_ids}


def usable_pairs(pairs: list[dict], test_hashes: set[str]) -> tuple[list[dict], dict[str, int]]:
    """The pairs that may train, explanations cleaned; and how many were skipped, by reason."""
    kept, skipped = [], {"elpv_test_frames": 0, "bad_explanations": 0}
    for pair in pairs:
        if bundle_lib.file_sha256(pair["frame_file"]) in test_hashes:
            skipped["elpv_test_frames"] += 1
            continue
        try:
            texts = {side: check_explanation(pair[side]) for side in ("chosen", "rejected")}
        except BadExplanation:
            skipped["bad_explanations"] += 1
            continue
        kept.append({**pair, **texts})
    return kept, skipped


def split_by_inspection(pairs: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """Held-out = the inspections with the lowest sha256 of their id (stable as data grows)."""
    inspections = sorted({p["inspection"] for p in pairs}, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    n_held = min(max(1, round(fraction * len(inspections))), len(inspections) - 1)
    held = set(inspections[:n_held])
    return [p for p in pairs if p["inspection"] not in held], [p for p in pairs if p["inspection"] in held]


def fleet_set(name: str, pairs: list[dict], size: int, repeat: int = 1) -> FleetSet:
    frames = np.stack([resize_gray(read_image(p["frame_file"]), size) for p in pairs])
    frames = np.concatenate([frames] * repeat) if repeat > 1 else frames
    return FleetSet(name, frames, [p["key"] for p in pairs] * repeat, pairs=pairs, repeat=repeat)


# ------------------------------------------------------------------ 4. the gate
@torch.no_grad()
def golden_accuracy(model, enc: Encoder, golden_cells: list[str]) -> float | None:
    """Share of the golden frames (ELPV cells) whose top catalog entry is the labelled one."""
    if not golden_cells:
        return None
    by_id = {c.id: c for c in elpv.read_cells()}
    cells = [by_id[c] for c in golden_cells if c in by_id]
    catalog = el_catalog()
    images = elpv.load_images(cells, enc.spec.image_size)
    ids, mask = enc.texts(catalog.displays)
    model.eval()
    r = model.scorer(model.image_encoder(enc.frames(images)), model.text_encoder(ids, mask)).numpy()
    truth = np.array([entry_index(catalog, c.level, c.cell_type) for c in cells])
    return float((r.argmax(1) == truth).mean())


def published_golden_cells(hq_state: "HQState | Path", line: str) -> list[str]:
    version = latest_bundle(hq_state, line)
    if version is None:
        return []
    expected = bundle_dir_of(open_state(hq_state), line, version) / "golden" / "expected.json"
    return [row["cell"] for row in json.loads(expected.read_text())] if expected.exists() else []


def gate(old: dict, new: dict, points: float) -> list[str]:
    """Reasons the new student may not ship (empty: it passes)."""
    reasons, tol = [], points / 100
    for key in ("elpv_val_pairwise", "golden_accuracy"):
        if old.get(key) is not None and new[key] < old[key] - tol:
            reasons.append(f"{key} fell from {old[key]:.4f} to {new[key]:.4f} (allowed: {points} points)")
    if not new["fleet_heldout_pairwise"] > old["fleet_heldout_pairwise"] and old["fleet_heldout_pairwise"] < 1.0:
        reasons.append(f"held-out fleet reviews did not improve ({old['fleet_heldout_pairwise']:.4f} -> "
                       f"{new['fleet_heldout_pairwise']:.4f})")
    return reasons


def measure(model, enc: Encoder, val_sets, heldout: FleetSet, golden_cells) -> dict:
    return {"elpv_val_pairwise": pairwise_accuracy(model, enc, [s for s in val_sets if s.name == "elpv-val"]),
            "fleet_heldout_pairwise": pairwise_accuracy(model, enc, [heldout]),
            "golden_accuracy": golden_accuracy(model, enc, golden_cells)}


# ------------------------------------------------------------------ the whole retrain
def check_request(cfg: TrainConfig, opts: RetrainOptions) -> None:
    """What can be checked before any model or data is loaded: config, options, signing key."""
    names = tuple(s.name for s in cfg.stages)
    if names != FLEET_STAGES:
        raise ConfigError(f"{cfg.name} is not a fleet retraining config (its stages are {list(names)}, "
                          f"retraining needs {list(FLEET_STAGES)}): use training/configs/fleet.yaml")
    if not is_whole(opts.fleet_repeat) or opts.fleet_repeat < 1:
        raise RetrainError(f"--fleet-repeat {opts.fleet_repeat}: each fleet pair must be seen at least once "
                           "per epoch; use a whole number of 1 or more (default 8)")
    if opts.key:
        bundle_lib.load_private_key(opts.key)     # a bad key fails here, not after all the training


def base_models(base: Path) -> tuple[RewardModel, RewardModel, RewardModel]:
    """Teacher, its proxy and student of the base run: a `linejudge train` run (multimodal/) or a
    previous `hq retrain` run (fleet/); both keep the student in distill/."""
    teacher_dir = next((base / name for name in ("fleet", "multimodal") if (base / name / "model").is_dir()), None)
    if teacher_dir is None or not (base / "distill" / "model").is_dir():
        raise RetrainError(f"--base {base} is not a finished run: it needs the teacher in multimodal/ "
                           "(a `linejudge train` run) or fleet/ (a previous `linejudge hq retrain` run), "
                           "each with model/ and proxy/, and the student in distill/model")
    teacher = load_model(teacher_dir / "model")
    proxy = load_model(teacher_dir / "proxy", expect=teacher.config)
    return teacher, proxy, load_model(base / "distill" / "model")


def fleet_inputs(base: Path, opts: RetrainOptions, train_pairs: list[dict], held_pairs: list[dict]) -> dict:
    """Everything outside the config that shapes what the stages learn."""
    return {"base_run": str(base.resolve()), "fleet_repeat": opts.fleet_repeat,
            "feedback_ids": sorted(p["key"] for p in train_pairs),
            "heldout_feedback_ids": sorted(p["key"] for p in held_pairs)}


def claim_fleet_inputs(out: Path, base: Path, opts: RetrainOptions,
                       pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs for this run directory, recorded in fleet_inputs.json. A run that
    already trained stages resumes with the reviews it started with, even if newer ones arrived
    since (they wait for the next retrain); it is refused if its base, --fleet-repeat or any of
    its reviews changed."""
    record = out / FLEET_INPUTS
    previous = json.loads(record.read_text()) if record.exists() else None
    trained = [name for name in FLEET_STAGES if (out / name).exists()]
    if trained:
        train_pairs, held_pairs = _recorded_pairs(out, previous, fleet_inputs(base, opts, [], []), pairs)
    else:
        train_pairs, held_pairs = split_by_inspection(pairs, opts.heldout_fraction)
        record.write_text(json.dumps(fleet_inputs(base, opts, train_pairs, held_pairs), indent=2) + "\n")
    return train_pairs, held_pairs


def _recorded_pairs(out: Path, previous: dict | None, now: dict, pairs: list[dict]):
    if previous is None:
        raise RetrainError(f"{out} has trained stages but no {FLEET_INPUTS} saying which reviews trained "
                           "them; use a new --out")
    changed = [k for k in ("base_run", "fleet_repeat") if previous.get(k) != now[k]]
    by_key = {p["key"]: p for p in pairs}
    missing = [k for k in previous["feedback_ids"] + previous["heldout_feedback_ids"] if k not in by_key]
    if changed or missing:
        what = ", ".join(changed) + (" differ" if changed else "") + \
            (f"{'; ' if changed else ''}{len(missing)} of its reviews are gone from HQ" if missing else "")
        raise RetrainError(f"{out} was trained on other inputs ({what}); use a new --out "
                           "(resuming there would reuse its trained stages)")
    newer = len(pairs) - len(previous["feedback_ids"]) - len(previous["heldout_feedback_ids"])
    if newer:
        print(f"resuming {out} with the {len(pairs) - newer} reviews it started with; "
              f"{newer} newer ones wait for the next retrain", flush=True)
    return ([by_key[k] for k in previous["feedback_ids"]], [by_key[k] for k in previous["heldout_feedback_ids"]])


def retrain(cfg: TrainConfig, opts: RetrainOptions, export_bundle: ExportBundle | None = None) -> dict:
    """Run every step; returns the report (also written to out/retrain.json)."""
    check_request(cfg, opts)
    out = Path(opts.out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = Path(opts.base_run)
    teacher, proxy, student = base_models(base)
    cfg = replace(cfg, teacher=teacher.config, student=student.config)   # the models come from the base run
    claim_run_dir(cfg, out)
    seed_everything(cfg.seed)
    spec = preprocess_spec(cfg)
    enc = Encoder(spec)
    pairs, skipped = usable_pairs(fleet_pairs(opts.hq_state), elpv_test_hashes())
    if any(skipped.values()):
        print(f"skipped fleet records: {skipped['elpv_test_frames']} ELPV test frames, "
              f"{skipped['bad_explanations']} with an empty or overlong explanation", flush=True)
    if len({p["inspection"] for p in pairs}) < 2:
        raise RetrainError(f"HQ at {open_state(opts.hq_state).dir} holds usable reviews of "
                           f"{len({p['inspection'] for p in pairs})} inspection(s) with frames; fleet retraining "
                           "needs at least 2 (one is held out). Let the appliances sync their reviews first.")
    train_pairs, held_pairs = claim_fleet_inputs(out, base, opts, pairs)
    data = build_data(cfg, spec.image_size)
    check_no_test_cells(data["train"] + data["val"])
    fleet_train = fleet_set("fleet-train", train_pairs, spec.image_size, opts.fleet_repeat)
    heldout = fleet_set("fleet-heldout", held_pairs, spec.image_size)
    train_sets = [fleet_train, *data["train"]]
    golden_cells = published_golden_cells(opts.hq_state, opts.line)

    before = measure(student, enc, data["val"], heldout, golden_cells)

    fleet_stage, distill_stage = cfg.stages
    elpv_val = elpv_val_figures(data["val"], enc)
    stages = [run_stage(fleet_stage, teacher, enc, train_sets, data["val"], out, cfg.seed, proxy=proxy,
                        val_extra=elpv_val)]
    teacher.eval()
    stages.append(run_stage(distill_stage, student, enc, train_sets, data["val"], out, cfg.seed, teacher=teacher,
                            val_extra=elpv_val))
    after = measure(student, enc, data["val"], heldout, golden_cells)

    report = {"base_run": str(base), "config": cfg.name, "fleet_pairs": len(train_pairs),
              "heldout_pairs": len(held_pairs), "skipped": skipped, "fleet_repeat": opts.fleet_repeat,
              "feedback_ids": [p["key"] for p in train_pairs],
              "heldout_feedback_ids": [p["key"] for p in held_pairs], "golden_frames": len(golden_cells),
              "before": before, "after": after, "stages": [{k: v for k, v in s.items() if k != "config"}
                                                           for s in stages]}
    report["gate_failures"] = gate(before, after, opts.gate_points)
    report["published"] = None
    if not report["gate_failures"] and opts.key:
        if export_bundle is None:
            raise RetrainError("retrain was given a signing key but no exporter: pass "
                               "export.build_bundle.export_with_settings (as `linejudge hq retrain` does)")
        report["published"] = _export_and_publish(out, opts, report, export_bundle)
    (out / "retrain.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, out / "retrain.png")
    if report["gate_failures"]:
        raise RetrainError("the retrained model did not pass the gate, nothing was published: "
                           + "; ".join(report["gate_failures"]) + f" (report: {out / 'retrain.json'})")
    return report


def _export_and_publish(out: Path, opts: RetrainOptions, report: dict, export_bundle: ExportBundle) -> dict:
    parent = latest_bundle(opts.hq_state, opts.line)
    version = (parent or 0) + 1
    settings = {"line": opts.line, "version": version, "key": opts.key, "key_id": opts.key_id,
                "parent_version": parent, "feedback_ids": tuple(report["feedback_ids"]),
                "val_limit": opts.export_val_limit, "calibration_frames": opts.calibration_frames,
                **dict(opts.int8_gate)}
    bundle_dir = out / "bundle" / f"{opts.line}-v{version}"
    export_bundle(out, bundle_dir, settings)
    published = publish_bundle(opts.hq_state, bundle_dir)
    return {"version": version, "parent_version": parent, "bundle": str(bundle_dir), "hq_path": str(published)}


def _plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in report["before"] if report["before"][k] is not None and report["after"][k] is not None]
    x = np.arange(len(keys))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(x - 0.2, [report["before"][k] for k in keys], 0.4, label="current student")
    ax.bar(x + 0.2, [report["after"][k] for k in keys], 0.4, label="retrained student")
    ax.set_xticks(x, [k.replace("_", " ") for k in keys])
    ax.set_ylim(0, 1.05)
    ax.set_title("fleet retrain: " + ("passed the gate" if not report["gate_failures"] else "gate failed"))
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
