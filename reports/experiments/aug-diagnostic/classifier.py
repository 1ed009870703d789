"""Diagnostic: how much does geometric augmentation help the EfficientNet trunk on ELPV?

A plain 4-level classifier (the reward model's ImageEncoder, mean-pooled, one linear layer)
trained on ELPV train cells and scored on val (binary: p(level >= 2/3) >= 0.5). Not the
product: it isolates the trunk + augmentation from the reward-model losses, at ~5 min a run.

    .venv/bin/python reports/experiments/aug-diagnostic/classifier.py --aug base --epochs 8
"""
from __future__ import annotations

import argparse
import json
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from appliance.preprocess import PreprocessSpec
from models.reward_model import ImageEncoder, ModelConfig
from training.data import elpv
from training.data.batches import augment, elpv_set


def load_views(part: str, size: int, views: list[str]) -> np.ndarray:
    """(N, S, S, k) uint8: each 300x300 cell downsampled k ways. 'min' erodes first (thin
    dark cracks survive the downsampling), 'max' dilates first, 'area' is the appliance's."""
    kernel = np.ones((3, 3), np.uint8)
    prep = {"area": lambda g: g, "min": lambda g: cv2.erode(g, kernel), "max": lambda g: cv2.dilate(g, kernel)}
    cells = elpv.cells_for(part)
    out = np.empty((len(cells), size, size, len(views)), np.uint8)
    for i, cell in enumerate(cells):
        gray = cv2.imread(str(cell.path), cv2.IMREAD_GRAYSCALE)
        for j, v in enumerate(views):
            out[i, :, :, j] = cv2.resize(prep[v](gray), (size, size), interpolation=cv2.INTER_AREA)
    return out


def to_input(frames: np.ndarray, spec) -> torch.Tensor:
    x = (frames.astype(np.float32) / 255.0 - spec.mean) / spec.std       # (B, S, S, k)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(memory_format=torch.channels_last)


def widen_stem(enc: ImageEncoder, k: int) -> None:
    """k input channels, each with the gray stem's weights / k (same response to k equal views)."""
    old = enc.stem
    new = torch.nn.Conv2d(k, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    with torch.no_grad():
        new.weight.copy_(old.weight.repeat(1, k, 1, 1) / k)
    new.weight.requires_grad_(old.weight.requires_grad)
    enc.stem = new


def geometric(gray: np.ndarray, rng: np.random.Generator, mode: str) -> np.ndarray:
    if "rot90" in mode:
        gray = np.rot90(gray, int(rng.integers(4)))
    if "affine" in mode:
        s = gray.shape[0]
        m = cv2.getRotationMatrix2D((s / 2, s / 2), rng.uniform(-4, 4), rng.uniform(0.94, 1.06))
        m[:, 2] += rng.uniform(-0.03, 0.03, 2) * s
        gray = cv2.warpAffine(np.ascontiguousarray(gray), m, (s, s), flags=cv2.INTER_LINEAR,
                              borderMode=cv2.BORDER_REFLECT_101)
        gray = gray[..., None] if gray.ndim == 2 else gray
    return np.ascontiguousarray(gray)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--aug", default="base")           # base | base+rot90 | base+affine | ...
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--frozen", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--views", default="area")        # comma-separated: area, min, max
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    rng = np.random.default_rng(args.seed)
    spec = PreprocessSpec(image_size=args.size)
    train, val = elpv_set("train", args.size), elpv_set("val", args.size)
    views = args.views.split(",")
    train.images, val.images = load_views("train", args.size, views), load_views("val", args.size, views)
    cfg = ModelConfig(image_size=args.size, frozen_blocks=args.frozen, d_model=256)
    enc = ImageEncoder(cfg)
    widen_stem(enc, len(views))
    enc = enc.to(memory_format=torch.channels_last)
    head = torch.nn.Linear(cfg.d_model, 4)
    params = [p for m in (enc, head) for p in m.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    steps_per_epoch = (len(train) + 15) // 16
    history, t0 = [], time.time()
    for epoch in range(args.epochs):
        for g in optim.param_groups:
            g["lr"] = args.lr * 0.5 * (1 + np.cos(np.pi * epoch / args.epochs))
        enc.train(); head.train()
        order = rng.permutation(len(train))
        for start in tqdm(range(0, len(order), 16), total=steps_per_epoch, desc=f"epoch {epoch}"):
            idx = order[start:start + 16]
            frames = np.stack([geometric(augment(train.images[i], rng, True), rng, args.aug) for i in idx])
            x = to_input(frames, spec)
            logits = head(enc(x).mean(1))
            loss = F.cross_entropy(logits, torch.from_numpy(train.levels[idx]))
            optim.zero_grad(); loss.backward(); optim.step()
        history.append(evaluate(enc, head, val, spec))
        print(epoch, history[-1], flush=True)
    out = {"args": vars(args), "minutes": round((time.time() - t0) / 60, 1), "history": history,
           "best_binary": max(h["binary"] for h in history), "last": history[-1]}
    print(json.dumps(out))
    if args.json:
        open(args.json, "w").write(json.dumps(out, indent=1) + "\n")


@torch.no_grad()
def evaluate(enc, head, val, spec):
    enc.eval(); head.eval()
    probs = []
    for start in range(0, len(val), 64):
        probs.append(F.softmax(head(enc(to_input(val.images[start:start + 64], spec)).mean(1)), -1))
    p = torch.cat(probs).numpy()
    defective = val.levels >= 2
    return {"binary": round(float(((p[:, 2:].sum(1) >= 0.5) == defective).mean()), 4),
            "level": round(float((p.argmax(1) == val.levels).mean()), 4)}


if __name__ == "__main__":
    main()
