"""rot4 vs one view on an ELPV split with the shipped INT8 bundle: accuracy (training.metrics.elpv_metrics),
flags and escapes with the bundle's thresholds (runtime.judge), and verdict agreement under a quarter turn."""
import json, sys, time, numpy as np
from pathlib import Path
from appliance.runtime import ModelRuntime
from training.data.batches import elpv_set
from training.data import elpv
from training.metrics import elpv_metrics
split = sys.argv[1]
b = Path('models/bundles/el-solar-default'); manifest = json.loads((b / 'manifest.json').read_text())
data = elpv_set(split, 160)
truth = np.array([elpv.LEVELS[l] >= 0.5 for l in data.levels])
out = {}
for views in ("one", "rot4"):
    rt = ModelRuntime(b, manifest, threads=1, views=views,
                      thresholds={"p_defect": 0.27} if views == "rot4" else None)   # rot4: p_defect chosen on val
    started = time.perf_counter()
    js = [rt.judge(img) for img in data.images]
    ms = (time.perf_counter() - started) / len(js) * 1000
    turned = [rt.judge(np.rot90(img)) for img in data.images]
    m, _ = elpv_metrics(np.stack([j.rewards for j in js]), data)
    flagged = np.array([j.decision.flagged for j in js])
    called = np.array([bool(rt.is_defective(j.decision.verdict)) for j in js])
    out[views] = {"binary": round(m["elpv_binary_accuracy"], 4), "level": round(m["elpv_level_accuracy"], 4),
                  "binary_mono": round(m["elpv_binary_accuracy_mono"], 4), "binary_poly": round(m["elpv_binary_accuracy_poly"], 4),
                  "flagged": round(float(flagged.mean()), 4),
                  "escapes": round(float((truth & ~called & ~flagged).sum() / truth.sum()), 4),
                  "quarter_turn_agreement": round(float(np.mean([a.decision.verdict == t.decision.verdict for a, t in zip(js, turned)])), 4),
                  "ms_per_frame_one_thread": round(ms, 2)}
print(json.dumps({"split": split, "frames": len(js), **out}, indent=1))
