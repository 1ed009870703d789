"""Escapes against flags as p_defect sweeps, one view vs rot4 (shipped INT8 bundle, ELPV split)."""
import json, sys, numpy as np
from pathlib import Path
from appliance.runtime import ModelRuntime
from training.data.batches import elpv_set
from training.data import elpv
split = sys.argv[1]
b = Path('models/bundles/el-solar-default'); manifest = json.loads((b / 'manifest.json').read_text())
data = elpv_set(split, 160)
truth = np.array([elpv.LEVELS[l] >= 0.5 for l in data.levels])
res = {}
for views in ("one", "rot4"):
    rt = ModelRuntime(b, manifest, threads=1, views=views)
    defective = np.array([bool(x) for x in rt.catalog.defective])
    R = np.stack([rt.judge(img).rewards for img in data.images])
    p = np.exp(R - R.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    called = defective[R.argmax(1)]
    chance = np.where(called, 0.0, p[:, defective].sum(1))
    curve = []
    for t in np.linspace(0.02, 0.98, 97):
        flagged = chance >= t
        curve.append((float(flagged.mean()), float((truth & ~called & ~flagged).sum() / truth.sum()), float(t)))
    def at(rate):
        ok = [c for c in curve if c[0] <= rate]
        return min(ok, key=lambda c: c[1]) if ok else None
    res[views] = {"binary_verdict": round(float((called == truth).mean()), 4),
                  "missed_before_flags": round(float((truth & ~called).sum() / truth.sum()), 4),
                  "at_25pct_flagged": [round(x, 3) for x in at(0.25)], "at_15pct_flagged": [round(x, 3) for x in at(0.15)],
                  "at_35pct_flagged": [round(x, 3) for x in at(0.35)]}
print(json.dumps({"split": split, "note": "[flag rate, escape rate, p_defect]", **res}, indent=1))
