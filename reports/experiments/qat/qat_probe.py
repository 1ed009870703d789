"""Quantization-aware self-distillation of a student's image encoder (issue 18, INT8 fidelity).

The student's image encoder is fine-tuned so that its fake-quantized forward (the scheme export
uses: weights int8 per output channel in 7 bits, |q| <= 64, with BatchNorm folded in; uint8
activations per tensor, MinMax ranges over 320 train frames, refreshed each epoch; EfficientNet
blocks before FIRST stay fp32, as `--keep-fp32 /blocks.0/ /blocks.1/`) reproduces the original
fp32 encoder's patch features, with ANCHOR times the same loss on the fp32 forward so the fp32
graph stays near the original too. Writes a copy of the run directory with the tuned student,
for `linejudge export`.

    .venv/bin/python reports/experiments/qat/qat_probe.py runs/full-v3-avx2 /tmp/qat/run-b 3 3e-5 1.0
    .venv/bin/linejudge export --checkpoint /tmp/qat/run-b --out /tmp/qat/bundle-b --version 4 \
        --key K --key-id ID --keep-fp32 /blocks.0/ /blocks.1/
"""
import copy
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.preprocess import normalize
from models.reward_model import load_model, save_model
from training.data.batches import elpv_set

FIRST = 2          # EfficientNet blocks left in fp32 (export's --keep-fp32 /blocks.0/ /blocks.1/)
WEIGHT_LEVEL = 64  # |q| <= 64: onnxruntime's reduce_range for int8 weights


def fq_weight(w):
    s = (w.detach().abs().amax(dim=(1, 2, 3)) / WEIGHT_LEVEL).clamp_min(1e-12)
    return torch.fake_quantize_per_channel_affine(w, s, torch.zeros_like(s, dtype=torch.int32), 0,
                                                  -WEIGHT_LEVEL, WEIGHT_LEVEL)


class Ranges:
    """Per-tensor uint8 fake quantization; MinMax ranges (zero included) while calibrating."""
    def __init__(self, enabled: bool = True):
        self.lo, self.hi, self.calibrating, self.enabled = {}, {}, False, enabled

    def __call__(self, key, x):
        if not self.enabled:
            return x
        if self.calibrating:
            self.lo[key] = min(self.lo.get(key, 0.0), x.min().item())
            self.hi[key] = max(self.hi.get(key, 0.0), x.max().item())
            return x
        lo, hi = self.lo[key], self.hi[key]
        scale = max((hi - lo) / 255, 1e-12)
        return torch.fake_quantize_per_tensor_affine(x, scale, int(round(-lo / scale)), 0, 255)


def conv_bn(conv, bn, x):
    k = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    w, b = fq_weight(conv.weight * k.view(-1, 1, 1, 1)), bn.bias - bn.running_mean * k
    x = conv.static_padding(x) if hasattr(conv, "static_padding") else x
    return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)


def fq_encoder(enc, img, q):
    x = F.relu6(enc.bn0(enc.stem(img)))
    for blk in enc.blocks[:FIRST]:
        x = blk(x)
    x = q("in", x)
    for i, blk in enumerate(enc.blocks[FIRST:], FIRST):
        h, a = x, blk._block_args
        if a.expand_ratio != 1:
            h = q(f"{i}e", F.relu6(conv_bn(blk._expand_conv, blk._bn0, h)))
        h = q(f"{i}d", F.relu6(conv_bn(blk._depthwise_conv, blk._bn1, h)))
        h = q(f"{i}p", conv_bn(blk._project_conv, blk._bn2, h))
        if blk.id_skip and a.stride == 1 and a.input_filters == a.output_filters:
            h = q(f"{i}a", h + x)
        x = h
    x = q("proj", F.conv2d(x, fq_weight(enc.project.weight), enc.project.bias)).flatten(2).transpose(1, 2)
    return enc.norm(x + enc.position)


def snr(ref, y):
    return 10 * torch.log10((ref ** 2).mean() / ((ref - y) ** 2).mean()).item()


def batched(fn, x):
    with torch.no_grad():
        return torch.cat([fn(x[i:i + 64]) for i in range(0, len(x), 64)])


def calibrate(enc, q, frames):
    q.lo, q.hi, q.calibrating = {}, {}, True
    with torch.no_grad():
        for i in range(0, 320, 32):
            fq_encoder(enc, frames[i * 5 % len(frames):][:32], q)
    q.calibrating = False


def load(run: str):
    model = load_model(Path(run) / "distill" / "model")
    spec = model.config.preprocess_spec()
    frames = {part: torch.from_numpy(normalize(elpv_set(part, spec.image_size).images, spec)) for part in ("train", "val")}
    return model, frames


def main(src: str, out: str, epochs: int, lr: float, anchor: float) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model, frames = load(src)
    Xtr, Xva = frames["train"], frames["val"]
    enc = model.image_encoder.eval()
    ref = copy.deepcopy(enc).eval()
    Rva = batched(ref, Xva)
    q = Ranges()

    def report(what):
        print(f"{what}: val SNR to the original encoder, fake-quantized "
              f"{snr(Rva, batched(lambda x: fq_encoder(enc, x, q), Xva)):.1f} dB, fp32 {snr(Rva, batched(enc, Xva)):.1f} dB",
              flush=True)

    calibrate(enc, q, Xtr)
    report("before")
    params = [p for blk in enc.blocks[FIRST:] for p in blk.parameters()] + list(enc.project.parameters())
    for p in enc.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    for epoch in range(epochs):
        perm, t0, losses = torch.randperm(len(Xtr)), time.time(), []
        for s in range(0, len(perm) - 15, 16):
            x = torch.rot90(Xtr[perm[s:s + 16]], int(torch.randint(0, 4, ()).item()), (2, 3))
            with torch.no_grad():
                target = ref(x)
            loss = F.mse_loss(fq_encoder(enc, x, q), target) + anchor * F.mse_loss(enc(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        calibrate(enc, q, Xtr)
        report(f"epoch {epoch + 1} (loss {np.mean(losses):.4f}, {time.time() - t0:.0f} s)")
    shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.pt"))
    save_model(model, Path(out) / "distill" / "model")
    print("saved", out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
