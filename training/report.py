"""HTML report with PNG plots for an evaluation (matplotlib, no display needed)."""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HEADLINE = ("elpv_binary_accuracy", "elpv_level_accuracy", "elpv_binary_accuracy_mono",
            "elpv_binary_accuracy_poly", "elpv_level_accuracy_mono", "elpv_level_accuracy_poly",
            "pairwise_accuracy", "best_of_n_accuracy", "image_swap_accuracy", "blank_frame_accuracy",
            "text_only_proxy_accuracy", "seen_phrasing_accuracy", "heldout_phrasing_accuracy",
            "ece", "teacher_pairwise_accuracy", "student_vs_teacher_pairwise", "parameters")


def _confusion_png(matrix, labels, title, path):
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(3.6, 3.2))
    ax.imshow(m, cmap="Blues")
    for (i, j), v in np.ndenumerate(m):
        ax.text(j, i, str(v), ha="center", va="center", color="black" if v < m.max() / 2 else "white")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reliability_png(table, ece, path):
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.plot([0, 1], [0, 1], "--", color="gray")
    if table:
        mids = [(r["lo"] + r["hi"]) / 2 for r in table]
        ax.bar(mids, [r["accuracy"] for r in table], width=0.09, alpha=0.7, label="accuracy")
        ax.plot([r["confidence"] for r in table], [r["accuracy"] for r in table], "o-", color="C1")
    ax.set_xlabel("P(first explanation is better)")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"reliability (ECE {ece:.3f})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _anchors_png(metrics, anchors, path):
    names = list(anchors) + ["linejudge (this model)"]
    values = list(anchors.values()) + [metrics["elpv_binary_accuracy"]]
    fig, ax = plt.subplots(figsize=(6.4, 2.8))
    colors = ["#999"] * len(anchors) + ["C0"]
    ax.barh(names, values, color=colors)
    for i, v in enumerate(values):
        ax.text(v + 0.003, i, f"{v:.3f}", va="center")
    ax.set_xlim(0.7, 1.0)
    ax.set_title("ELPV accuracy against published anchors")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reliance_png(metrics, path):
    keys = [("pairwise (true frame)", "synthetic_pairwise_accuracy"), ("frames swapped", "image_swap_accuracy"),
            ("blank frame", "blank_frame_accuracy"), ("text-only proxy", "text_only_proxy_accuracy"),
            ("held-out phrasing", "heldout_phrasing_accuracy")]
    keys += [(f"{kind} changed", f"synthetic_pairwise_accuracy_{kind}")
             for kind in ("presence", "type", "location", "severity")]
    keys = [(n, k) for n, k in keys if k in metrics]
    fig, ax = plt.subplots(figsize=(8.4, 3.0))
    ax.bar([n for n, _ in keys], [metrics[k] for _, k in keys], color="C2")
    ax.axhline(0.5, color="gray", ls="--", lw=1)
    ax.set_ylim(0, 1)
    ax.set_title("does the model look at the frame?")
    ax.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(metrics: dict, extras: dict, path: Path, anchors: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    pngs = {
        "levels": (f"{stem}_confusion_levels.png", lambda p: _confusion_png(metrics["confusion_level"], ["0", "1/3", "2/3", "1"], "ELPV defect level", p)),
        "binary": (f"{stem}_confusion_binary.png", lambda p: _confusion_png(metrics["confusion_binary"], ["ok", "defective"], "ELPV defective (p>=0.5)", p)),
        "reliability": (f"{stem}_reliability.png", lambda p: _reliability_png(extras.get("reliability", []), metrics["ece"], p)),
        "anchors": (f"{stem}_anchors.png", lambda p: _anchors_png(metrics, anchors, p)),
        "reliance": (f"{stem}_image_reliance.png", lambda p: _reliance_png(metrics, p)),
    }
    for name, draw in pngs.values():
        draw(path.parent / name)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{metrics[k]:.4f}</td></tr>" if isinstance(metrics[k], float)
                   else f"<tr><td>{html.escape(k)}</td><td>{metrics[k]}</td></tr>"
                   for k in HEADLINE if k in metrics)
    anchor_rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4f}</td></tr>" for k, v in anchors.items())
    images = "".join(f'<img src="{name}" alt="{key}">' for key, (name, _) in pngs.items())
    path.write_text(f"""<!doctype html><html><head><meta charset="utf-8"><title>linejudge evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td{{padding:2px 12px}}img{{margin:6px;border:1px solid #ddd}}</style></head>
<body><h1>linejudge evaluation: {html.escape(str(metrics.get('model')))} on ELPV {html.escape(str(metrics.get('split')))}</h1>
<h2>Headline</h2><table>{rows}</table>
<h2>Published anchors (ELPV)</h2><table>{anchor_rows}</table>
<h2>Plots</h2>{images}</body></html>
""")
    return path
