"""The training stages: text (shortcut proxy), multimodal (shortcut-aware BT), distill.

Each stage is a loop over candidate-set batches with one loss function. The loop shows a
progress bar with loss and ETA, keeps the epoch with the best validation pairwise accuracy
or, with `select: elpv_binary`, ELPV binary accuracy (validation never includes ELPV test
cells), checkpoints after every epoch and resumes from the last checkpoint when the run is
started again.

Resuming reproduces the run done in one go: besides the weights, each checkpoint stores the
global random generators (torch's, which dropout and new weights draw from; numpy's and
Python's), rank 0's in checkpoint.pt and every other rank's in run_state.rank<r>.pt. A resumed
stage, or a finished stage that is skipped, restores them, so the next epoch or stage draws
exactly what it would have in one go.
"""
from __future__ import annotations

import copy
import json
import random
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.errors import ConfigError
from models.preprocess import PreprocessSpec, TextTokenizer, normalize
from models.reward_model import EFFICIENTNET_BLOCKS, RewardModel, bradley_terry_loss, minilm_dir, save_model
from training.config import SELECT_BY, StageConfig
from training.data.batches import CandidateSet, iterate_batches
from training.data.synthetic import FACT_CLASSES
from training import distributed


class Encoder:
    """Turns uint8 frames and strings into model inputs, exactly as the appliance does."""

    def __init__(self, spec: PreprocessSpec):
        self.spec = spec
        self.tokenizer = TextTokenizer(minilm_dir() / "tokenizer.json", spec.max_tokens)
        self._blank = None

    def frames(self, gray: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(normalize(np.ascontiguousarray(gray), self.spec))

    def blank(self, n: int) -> torch.Tensor:
        return self.frames(np.full((n, self.spec.image_size, self.spec.image_size), 128, np.uint8))

    def texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenizer.encode(texts)
        return torch.from_numpy(ids), torch.from_numpy(mask)


def rewards(model: RewardModel, enc: Encoder, frames, texts, c: int, blank=False, with_patches=False):
    """(B*C) texts against B frames -> (B, C); a blank frame is encoded once, not B times.
    with_patches returns the model's Outputs (patch grid, level logits) for the training heads."""
    ids, mask = enc.texts(texts)
    if blank:
        return model(enc.blank(1), ids, mask, len(texts)).reshape(len(frames), c)
    return model(enc.frames(frames), ids, mask, c, with_patches=with_patches)


class TrainBatch(NamedTuple):
    frames: np.ndarray          # (B, S, S) uint8
    texts: list[str]            # B*C, the right candidate first in each group of C
    c: int
    labels: np.ndarray | None   # (B, 3) synthetic type/location/severity classes, else None
    levels: np.ndarray | None = None        # (B,) ELPV defect level of each frame, else None
    text_levels: np.ndarray | None = None   # (B, C) the level each candidate states, else None
    text_facts: np.ndarray | None = None    # (B, C, 3) the facts each candidate states (K_s: not stated)


class FactHead(nn.Module):
    """Training-only, for a model without fact slots (fact_weight 0): reads a synthetic frame's
    defect type, 3x3 cell and severity off its patch grid. Its loss teaches the image features
    the facts the hard negatives change (it makes type learnable within a few epochs:
    reports/measurements.md); it is never saved with the model."""

    def __init__(self, grid: int, d: int):
        super().__init__()
        self.linear = nn.Linear(grid * grid * d, sum(FACT_CLASSES))

    def forward(self, patches: torch.Tensor, labels: np.ndarray) -> torch.Tensor:
        return _slot_loss(self.linear(patches.flatten(1)).split(FACT_CLASSES, dim=-1), labels)


def fact_term(head, out, batch: TrainBatch, stage: StageConfig):
    """fact_loss x cross-entropy of the facts: with fact slots in the model, of its image heads
    on the synthetic frames' facts and of its text heads on the facts each candidate states
    ("not stated" for an ELPV catalog entry); without, of the training-only FactHead."""
    if not stage.fact_loss:
        return 0.0
    if out.image_facts is not None:
        return stage.fact_loss * (_slot_loss(out.image_facts, batch.labels)
                                  + _slot_loss(out.text_facts, batch.text_facts))
    if head is None or batch.labels is None:
        return 0.0
    return stage.fact_loss * head(out.patches, batch.labels)


def _slot_loss(logits, labels: np.ndarray | None):
    """Summed over the fact slots: cross-entropy of (..., K) logits against (..., slots) classes."""
    if labels is None:
        return 0.0
    target = torch.from_numpy(labels)
    return sum(F.cross_entropy(lg.flatten(0, -2), target[..., k].flatten()) for k, lg in enumerate(logits))


def level_term(out, batch: TrainBatch, weight: float, ordinal: float = 0.0):
    """Cross-entropy of the image level head on the ELPV cells' levels and of the text level head
    on the levels their candidate explanations state (free labels: the catalog's facts), plus
    `ordinal` times the image head's ordinal term."""
    if not weight or batch.levels is None or out.image_levels is None:
        return 0.0
    levels = torch.from_numpy(batch.levels)
    image = F.cross_entropy(out.image_levels, levels)
    text = F.cross_entropy(out.text_levels.flatten(0, 1), torch.from_numpy(batch.text_levels).flatten())
    return weight * (image + text) + (ordinal * ordinal_loss(out.image_levels, levels) if ordinal else 0.0)


def ordinal_loss(level_logits: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The levels are ordered (0, 1/3, 2/3, 1 probability of a defect): binary cross-entropy of
    P(level >= k) = the softmax mass from k up, for k = 1, 2, 3, so that "2/3 instead of 1" costs
    less than "0 instead of 1"; the k = 2 term is the binary verdict's own loss."""
    total = level_logits.logsumexp(-1)
    ks = range(1, level_logits.shape[-1])
    # in log space, so that a confident far miss still has a gradient
    log_at_least = torch.stack([level_logits[:, k:].logsumexp(-1) for k in ks], -1) - total[:, None]
    log_below = torch.stack([level_logits[:, :k].logsumexp(-1) for k in ks], -1) - total[:, None]
    target = (levels[:, None] >= torch.tensor(list(ks), device=levels.device)).float()
    return -(target * log_at_least + (1 - target) * log_below).mean()


def pair_losses(r: torch.Tensor) -> torch.Tensor:
    """(B, C) rewards with the right candidate first -> (B, C-1) BT losses."""
    return bradley_terry_loss(r[:, :1], r[:, 1:])


def centring(r: torch.Tensor) -> torch.Tensor:
    return (r ** 2).mean()


# ------------------------------------------------------------------ loss per stage
def text_step(model, proxy, teacher, head, enc, stage: StageConfig, batch: TrainBatch):
    """Text-only pairs (blank frame): specific, consistent over vague or contradictory."""
    frames, texts, c = batch[:3]
    r = rewards(model, enc, frames, texts, c, blank=True)
    return pair_losses(r).mean() + stage.centring * centring(r)


def classify_step(model, proxy, teacher, head, enc, stage: StageConfig, batch: TrainBatch):
    """Classifier first: the trunk and the level heads learn the ELPV levels alone (cross-entropy),
    before any preference pair shares the trunk with synthetic frames."""
    frames, texts, c = batch[:3]
    return level_term(rewards(model, enc, frames, texts, c, with_patches=True), batch, 1.0, stage.level_ordinal)


def multimodal_step(model, proxy, teacher, head, enc, stage: StageConfig, batch: TrainBatch):
    """Bradley-Terry with shortcut-aware weights (Li et al., arXiv 2503.03122).

    The proxy sees a blank frame and is trained alongside on the same pairs. Pair weight
    w = L_t / (L_m + L_t) without gradient: pairs the text alone decides count little.
    Weights are divided by their batch mean, so they reweight pairs against each other
    without also shrinking the overall learning rate (our deviation from the paper).
    """
    frames, texts, c = batch[:3]
    out = rewards(model, enc, frames, texts, c, with_patches=True)
    r_m, loss_m = out.rewards, pair_losses(out.rewards)
    facts = fact_term(head, out, batch, stage) + level_term(out, batch, stage.level_loss, stage.level_ordinal)
    if not stage.shortcut_weighting or proxy is None:
        return loss_m.mean() + stage.centring * centring(r_m) + facts
    r_t = rewards(proxy, enc, frames, texts, c, blank=True)
    loss_t = pair_losses(r_t)
    weight = (loss_t / (loss_m + loss_t + 1e-8)).detach()
    weight = weight / weight.mean().clamp_min(1e-6)   # relative weights: keep the step size
    return (weight * loss_m + loss_t).mean() + stage.centring * (centring(r_m) + centring(r_t)) + facts


def distill_step(student, proxy, teacher, head, enc, stage: StageConfig, batch: TrainBatch):
    """Match the teacher's preference distribution over each candidate set + true pairs."""
    frames, texts, c = batch[:3]
    out = rewards(student, enc, frames, texts, c, with_patches=True)
    r_s = out.rewards
    with torch.no_grad():
        r_t = rewards(teacher, enc, frames, texts, c)
    t = stage.temperature
    kl = F.kl_div(F.log_softmax(r_s / t, -1), F.softmax(r_t / t, -1), reduction="batchmean") * t * t
    # match reward scale too, so thresholds calibrated on the teacher carry over
    scale = F.mse_loss(r_s - r_s.mean(-1, keepdim=True), r_t - r_t.mean(-1, keepdim=True))
    true_pairs = pair_losses(r_s).mean()
    return (stage.distill_alpha * (kl + 0.1 * scale) + (1 - stage.distill_alpha) * true_pairs
            + stage.centring * centring(r_s) + fact_term(head, out, batch, stage)
            + level_term(out, batch, stage.level_loss, stage.level_ordinal))


# fleet: the multimodal loss on operator preference pairs mixed with replay of the base data
STEPS = {"text": text_step, "classify": classify_step, "multimodal": multimodal_step, "distill": distill_step, "fleet": multimodal_step}


# ------------------------------------------------------------------ validation
@torch.no_grad()
def pairwise_accuracy(model: RewardModel, enc: Encoder, sets: list[CandidateSet], seed: int = 0,
                      batch_size: int = 64, blank: bool = False) -> float:
    model.eval()
    rng = np.random.default_rng(seed)
    correct = total = 0
    for data in sets:
        for frames, texts, c, _ in iterate_batches(data, batch_size, rng, train=False):
            r = rewards(model, enc, frames, texts, c, blank=blank)
            correct += int((r[:, :1] > r[:, 1:]).sum())
            total += r.shape[0] * (c - 1)
    return correct / max(total, 1)


# ------------------------------------------------------------------ the loop
def _mixed_batches(sets, batch_size, rng, max_steps):
    """Batches from every set, interleaved at random; each batch comes from one set."""
    iterators = [iterate_batches(d, batch_size, rng, train=True,
                                 indices=distributed.shard(np.arange(len(d)))) for d in sets]
    plan = np.concatenate([np.full(-(-len(distributed.shard(np.arange(len(d)))) // batch_size), k)
                           for k, d in enumerate(sets)])
    plan = rng.permutation(plan)[:max_steps] if max_steps else rng.permutation(plan)
    for k in plan:
        batch = next(iterators[k], None)
        if batch is not None:
            frames, texts, c, idx = batch
            yield TrainBatch(frames, texts, c, sets[k].fact_labels(idx), *sets[k].level_labels(idx),
                             sets[k].text_fact_labels(idx, c))


def run_stage(stage: StageConfig, model: RewardModel, enc: Encoder, train_sets, val_sets,
              out_dir: Path, seed: int, proxy: RewardModel | None = None,
              teacher: RewardModel | None = None,
              val_extra: Callable[[RewardModel], dict] | None = None) -> dict:
    """Train one stage into out_dir/<stage>; resumes from its checkpoint; returns metrics.

    val_extra(model) adds more validation figures to each epoch's history (e.g. ELPV binary
    accuracy); stage.select names the figure that picks the epoch kept."""
    if stage.select != "pairwise" and val_extra is None:
        raise ConfigError(f"stage {stage.name}: select: {stage.select} needs ELPV validation cells, and this "
                          f"run has none; set data.use_elpv: true")
    stage_dir = Path(out_dir) / stage.name
    done = stage_dir / "done.json"
    if done.exists():  # finished earlier: reload (weights and random state) and move on
        _load_states(stage_dir / "checkpoint.pt", model, proxy, final=True)
        return json.loads(done.read_text())
    stage_dir.mkdir(parents=True, exist_ok=True)
    trained = [m for m in (model, proxy) if m is not None]
    with _trunk_frozen(trained, stage.freeze_trunk):
        return _train_stage(stage, model, enc, train_sets, val_sets, stage_dir, seed, proxy, teacher, val_extra)


@contextmanager
def _trunk_frozen(models: list[RewardModel], frozen: bool):
    """freeze_trunk: for this stage every EfficientNet block runs without gradient and with its
    BatchNorm statistics as they are (ImageEncoder's own freezing, widened to all blocks)."""
    if not frozen:
        yield
        return
    encoders = [(m.image_encoder, m.image_encoder.frozen_blocks) for m in models]
    for encoder, _ in encoders:
        encoder.frozen_blocks = EFFICIENTNET_BLOCKS
        for p in encoder.frozen_parameters():
            p.requires_grad_(False)
    try:
        yield
    finally:
        for encoder, blocks in encoders:
            encoder.frozen_blocks = blocks
            for block in encoder.blocks[blocks:]:
                for p in block.parameters():
                    p.requires_grad_(True)


def _train_stage(stage: StageConfig, model: RewardModel, enc: Encoder, train_sets, val_sets, stage_dir: Path,
                 seed: int, proxy, teacher, val_extra) -> dict:
    trained = [m for m in (model, proxy) if m is not None]
    for m in trained + ([teacher] if teacher is not None else []):
        m.image_encoder.to(memory_format=torch.channels_last)   # same maths, 1.5-1.7x faster convs on CPU
    head = FactHead(model.config.grid, model.config.d_model) if stage.fact_loss and not model.config.fact_weight \
        else None
    optimized = trained + ([head] if head is not None else [])
    params = [p for m in optimized for p in m.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    wrapped = distributed.wrap(model)
    wrapped_proxy = distributed.wrap(proxy) if proxy is not None else None   # its gradients are averaged too
    wrapped_head = distributed.wrap(head) if head is not None else None
    start, best, history = _resume(stage_dir / "checkpoint.pt", model, proxy, optim, head)
    initial = _trainable_snapshot(trained)
    step_fn = STEPS[stage.name]

    def run_step(batch: TrainBatch) -> torch.Tensor:
        return step_fn(wrapped, wrapped_proxy, teacher, wrapped_head, enc, stage, batch)
    for epoch in range(start, stage.epochs):
        losses = _train_epoch(stage, epoch, seed, train_sets, optim, params, optimized, run_step)
        for m in trained:
            distributed.sync_buffers(m)   # every rank validates (and keeps) the same model
        val = pairwise_accuracy(model, enc, val_sets, seed=seed, blank=stage.name == "text")
        history.append({**_epoch_record(epoch, losses, val), **(val_extra(model) if val_extra is not None else {})})
        key = SELECT_BY[stage.select]
        if best is None or history[-1][key] >= best.get(key, -np.inf):
            best = {**history[-1], "model": copy.deepcopy(model.state_dict()),
                    "proxy": copy.deepcopy(proxy.state_dict()) if proxy is not None else None}
        if distributed.is_main():
            shown = "  ".join(f"{k} {v:.4f}" for k, v in history[-1].items() if k.startswith("val_"))
            print(f"[{stage.name}] epoch {epoch + 1}: loss {history[-1]['loss']:.4f}  {shown}", flush=True)
            _save_checkpoint(stage_dir / "checkpoint.pt", epoch + 1, model, proxy, optim, best, history, head,
                             _run_state())
        else:
            _atomic_save({"epoch": epoch + 1, "run_state": _run_state()}, _rank_state_path(stage_dir))
    model.load_state_dict(best["model"])
    if proxy is not None and best["proxy"] is not None:
        proxy.load_state_dict(best["proxy"])
    unchanged = [n for n, p in _trainable_snapshot(trained).items()
                 if n in initial and torch.equal(p, initial[n])] if start == 0 else []
    return _finish_stage(stage, stage_dir, model, proxy, history, best, unchanged)


def _finish_stage(stage: StageConfig, stage_dir: Path, model, proxy, history: list, best: dict,
                  unchanged: list[str]) -> dict:
    """Save the kept epoch's model (and proxy) and done.json, which marks the stage finished."""
    metrics = {"stage": stage.name, "config": asdict(stage), "history": history,
               "unchanged_parameters": unchanged,
               "best_epoch": best["epoch"], "selected_by": SELECT_BY[stage.select],
               **{k: v for k, v in best.items() if k.startswith("val_")}}
    if distributed.is_main():
        save_model(model, stage_dir / "model")
        if proxy is not None:
            save_model(proxy, stage_dir / "proxy")
        (stage_dir / "done.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _train_epoch(stage: StageConfig, epoch: int, seed: int, train_sets, optim, params, optimized,
                 run_step: Callable[[TrainBatch], torch.Tensor]) -> list[float]:
    """One epoch over the mixed batches at this epoch's cosine learning rate; the step losses."""
    rng = np.random.default_rng([seed, epoch])
    for group in optim.param_groups:
        group["lr"] = stage.lr * 0.5 * (1 + np.cos(np.pi * epoch / stage.epochs))
    for m in optimized:
        m.train()
    bar = tqdm(_mixed_batches(train_sets, stage.batch_size, rng, stage.max_steps_per_epoch),
               total=_count_steps(train_sets, stage), desc=f"{stage.name} {epoch + 1}/{stage.epochs}",
               disable=not distributed.is_main(), dynamic_ncols=True)
    losses = []
    for batch in bar:
        loss = run_step(batch)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    return losses


def _epoch_record(epoch: int, losses: list[float], val_pairwise: float) -> dict:
    window = max(1, len(losses) // 5)
    return {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_pairwise_accuracy": val_pairwise,
            "loss_first": float(np.mean(losses[:window])), "loss_last": float(np.mean(losses[-window:]))}


def _trainable_snapshot(models) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, m in enumerate(models)
            for n, p in m.named_parameters() if p.requires_grad}


def _count_steps(sets, stage: StageConfig) -> int:
    n = sum(-(-len(distributed.shard(np.arange(len(d)))) // stage.batch_size) for d in sets)
    return min(n, stage.max_steps_per_epoch) if stage.max_steps_per_epoch else n


def _run_state() -> dict:
    """This process's random state: what the next epoch draws depends on it."""
    rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"rng": rng}


def _restore_run_state(state: dict | None) -> None:
    if not state:   # a checkpoint from before run states were kept
        return
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def _rank_state_path(stage_dir: Path) -> Path:
    return Path(stage_dir) / f"run_state.rank{distributed.rank()}.pt"


def _this_ranks_run_state(checkpoint_path: Path, checkpoint: dict) -> dict | None:
    """Rank 0's run state is in the checkpoint; another rank's in its own file, if of the same epoch."""
    if distributed.is_main():
        return checkpoint.get("run_state")
    path = _rank_state_path(Path(checkpoint_path).parent)
    mine = torch.load(path, weights_only=False) if path.exists() else None
    if mine is None or mine["epoch"] != checkpoint["epoch"]:
        print(f"rank {distributed.rank()}: no run state for epoch {checkpoint['epoch']} in {path}; "
              f"this rank goes on from its current random state", flush=True)
        return None
    return mine["run_state"]


def _atomic_save(obj, path: Path) -> None:
    tmp = Path(path).with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _save_checkpoint(path: Path, epoch, model, proxy, optim, best, history, head=None, run_state=None):
    _atomic_save({"epoch": epoch, "model": model.state_dict(), "optim": optim.state_dict(),
                  "proxy": proxy.state_dict() if proxy is not None else None,
                  "fact_head": head.state_dict() if head is not None else None,
                  "best": best, "history": history, "run_state": run_state}, path)


def _resume(path: Path, model, proxy, optim, head=None):
    if not path.exists():
        return 0, None, []
    state = torch.load(path, weights_only=False)
    model.load_state_dict(state["model"])
    if proxy is not None and state["proxy"] is not None:
        proxy.load_state_dict(state["proxy"])
    if head is not None and state.get("fact_head") is not None:
        head.load_state_dict(state["fact_head"])
    optim.load_state_dict(state["optim"])
    # after the fact head's init, so the next epoch draws what it would have in one go
    _restore_run_state(_this_ranks_run_state(path, state))
    print(f"resuming from {path} after epoch {state['epoch']}", flush=True)
    return state["epoch"], state["best"], state["history"]


def _load_states(path: Path, model, proxy, final: bool):
    state = torch.load(path, weights_only=False)
    best = state["best"] if final else state
    model.load_state_dict(best["model"])
    if proxy is not None and best.get("proxy") is not None:
        proxy.load_state_dict(best["proxy"])
    _restore_run_state(_this_ranks_run_state(path, state))   # as the stage left it
