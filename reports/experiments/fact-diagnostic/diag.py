"""Diagnostic: can the student learn one-fact synthetic differences when trained on synthetic only?

A throwaway experiment script, kept so the figures in README.md can be rerun (from the repo root):
    T=1 python reports/experiments/fact-diagnostic/diag.py base 8 1200          # 3 negatives, BT only
    T=1 python reports/experiments/fact-diagnostic/diag.py tokens 8 1200        # scorer sees every text token
    K=16 T=2 python reports/experiments/fact-diagnostic/diag.py allneg 8 1200   # all 16 one-fact negatives
    AUX=0.5 K=16 T=2 python reports/experiments/fact-diagnostic/diag.py aux 5 1200  # + fact head (stopped after 4)
Prints per-fact pairwise accuracy on 300 synthetic val frames after every epoch.
"""
import sys, time, json, os
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import numpy as np, torch
from dataclasses import replace
from models.reward_model import RewardModel, STUDENT, TEACHER, bradley_terry_loss
from training.stages import Encoder, rewards
from training.data.batches import synthetic_set, iterate_batches
from training.data import elpv, synthetic
from appliance.preprocess import PreprocessSpec

variant = sys.argv[1]; epochs = int(sys.argv[2]); ntrain = int(sys.argv[3])
torch.set_num_threads(int(os.environ.get("T","1"))); torch.manual_seed(0)
size = 160
cfg = replace(STUDENT, frozen_blocks=3)
import models.reward_model as rm
if variant.startswith("tokens"):
    class TokPool(torch.nn.Module):
        def __init__(self, d): super().__init__(); self.norm = torch.nn.LayerNorm(d)
        def forward(self, tokens, pad): return self.norm(tokens) * (~pad)[..., None]
    orig = rm.SmallTextEncoder.__init__
    def init(self, c):
        orig(self, c); self.pool = TokPool(c.d_model)
    rm.SmallTextEncoder.__init__ = init
model = RewardModel(cfg)
from training.train import _minilm_word_embeddings
model.text_encoder.init_from_minilm(_minilm_word_embeddings())
enc = Encoder(PreprocessSpec(image_size=size, max_tokens=cfg.max_tokens))
bg = elpv.defect_free_backgrounds(size)
import os
K = int(os.environ.get("K", "3"))
import training.data.batches as B
_orig_hn = synthetic.hard_negatives
B.synthetic.hard_negatives = lambda f, rng, k=3: _orig_hn(f, rng, k=K)
tr = synthetic_set("st", ntrain, size, 1, 0.5, bg)
B.synthetic.hard_negatives = _orig_hn
va = synthetic_set("sv", 300, size, 2, 0.5, bg)
AUX = float(os.environ.get("AUX", "0"))
from training.data.synthetic import DEFECT_TYPES, LOCATIONS, SEVERITIES
aux_head = torch.nn.Linear(cfg.grid * cfg.grid * cfg.d_model, 7 + 10 + 4)
def aux_targets(idx):
    fs = [tr.facts[i] for i in idx]
    t = [0 if f.defect is None else 1 + DEFECT_TYPES.index(f.defect) for f in fs]
    l = [0 if f.defect is None else 1 + LOCATIONS.index(f.location) for f in fs]
    v = [0 if f.defect is None else 1 + SEVERITIES.index(f.severity) for f in fs]
    return torch.tensor(t), torch.tensor(l), torch.tensor(v)
params = [p for p in list(model.parameters()) + list(aux_head.parameters()) if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

@torch.no_grad()
def per_fact(data):
    model.eval(); rng = np.random.default_rng(0); hits = {k: [] for k in synthetic.FACT_KINDS}
    for frames, texts, c, idx in iterate_batches(data, 64, rng, train=False):
        r = rewards(model, enc, frames, texts, c)
        for row, i in enumerate(idx):
            for j, neg in enumerate(data.negatives[i]):
                hits[synthetic.changed_fact(data.facts[i], neg)].append(float(r[row, 0] > r[row, j + 1]))
    return {k: round(float(np.mean(v)), 3) for k, v in hits.items()}

for ep in range(epochs):
    t0 = time.time(); model.train(); rng = np.random.default_rng(ep); losses = []
    for g in opt.param_groups: g["lr"] = 1e-3 * 0.5 * (1 + np.cos(np.pi * ep / epochs))
    for frames, texts, c, idx in iterate_batches(tr, 16, rng, train=True):
        ids, mask = enc.texts(texts)
        patches = model.image_encoder(enc.frames(frames))
        r = model.scorer.score_pairs(patches.repeat_interleave(c, 0), model.text_encoder(ids, mask)).reshape(len(frames), c)
        loss = bradley_terry_loss(r[:, :1], r[:, 1:]).mean() + 0.01 * (r ** 2).mean()
        if AUX:
            lo = aux_head(patches.flatten(1)); t, l, v = aux_targets(idx)
            F = torch.nn.functional
            loss = loss + AUX * (F.cross_entropy(lo[:, :7], t) + F.cross_entropy(lo[:, 7:17], l) + F.cross_entropy(lo[:, 17:], v))
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step()
        losses.append(loss.item())
    print(variant, ep, f"loss {np.mean(losses):.3f}", "val", per_fact(va), f"{time.time()-t0:.0f}s", flush=True)
print(variant, "train", per_fact(synthetic_set("st", 300, size, 1, 0.5, bg)))
