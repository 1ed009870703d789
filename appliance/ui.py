"""The operator touchscreen (Gradio): Live, Review, History, Status.

Large type and touch-sized controls for gloved hands; one tap on the right explanation
files a review. Frames are shown as pixels, never as paths into the state directory.
Reviews need an operator logged in with a PIN (hashed in the store, locked after
repeated failures).
"""
from __future__ import annotations

from functools import partial

import cv2
import gradio as gr
import numpy as np

from models.errors import LinejudgeError
from models.preprocess import check_explanation

CSS = """
.gradio-container {font-size: 20px}
button, .gr-button {min-height: 64px !important; font-size: 22px !important}
input[type=text], input[type=password], textarea {font-size: 22px !important; min-height: 56px}
#verdict, #verdict p {font-size: 30px !important; font-weight: 700}
#flag, #flag p {font-size: 22px !important; color: #b45309}
.review-choices label {min-height: 64px; font-size: 22px !important; padding: 12px !important}
"""


def _rgb(frame: np.ndarray | None) -> np.ndarray | None:
    if frame is None:
        return None
    return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB) if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def _stored_frame(appliance, row: dict) -> np.ndarray | None:
    """Pixels of a logged frame (read here; no path is handed to the browser)."""
    path = row.get("frame_path")
    if not path:
        return None
    frame = cv2.imread(str(appliance.frame_file(path)), cv2.IMREAD_UNCHANGED)
    return _rgb(frame)


def model_banner(appliance) -> str:
    """A warning line while the model runs in a degraded mode, else empty."""
    golden = appliance.runtime.golden
    if golden is None or not golden.fallback:
        return ""
    return ("**Backup model in use**: slower, answers checked. Please tell the engineer "
            "(details on the Status page).")


def live_view(appliance):
    live = appliance.live
    banner = model_banner(appliance)
    if live.judgement is None:
        return None, "Waiting for the first part ...", [], banner
    d = live.judgement.decision
    verdict = f"#{live.inspection_id}  {d.verdict}  (confidence {d.p_best:.0%})"
    flag = ("FLAGGED for review: " + "; ".join(d.reasons)) if d.flagged else "OK - no review needed"
    ranking = [[text, round(score, 3)] for text, score in d.ranking]
    return _rgb(live.frame), verdict, ranking, "\n\n".join(filter(None, [banner, f"{flag}  |  {live.fps:.1f} frames/s"]))


def _golden_line(golden: dict | None) -> str:
    if not golden:
        return "**Golden check** not run"
    if golden["fallback"]:
        int8 = golden["int8"]
        return (f"**Golden check** INT8 FAILED on this CPU (worst reward delta {int8['worst_reward_delta']:.2f} "
                f"on {int8['worst_frame']}, {len(int8['failed_frames'])} of {int8['frames']} frames): running "
                f"the fp32 graphs, which pass (worst delta {golden['worst_reward_delta']:.4f}). Re-export the "
                "bundle with `linejudge bundle requantize`, or set on_golden_failure: refuse to stop instead")
    return (f"**Golden check** passed, {golden['precision'].upper()}: {golden['frames']} frames, worst reward "
            f"delta {golden['worst_reward_delta']:.4f}")


def status_view(appliance) -> str:
    s = appliance.status()
    p = s["platform"]
    lines = [model_banner(appliance),
             f"**Model** v{s['model_version']} on {s['provider']}, {s['precision'].upper()}",
             _golden_line(s["golden"]),
             f"**Computer** {p['cpu']} ({p['machine']}; {' '.join(p['isa']) or 'no AVX2/AVX-512/NEON'}; "
             f"INT8 path: {p['int8_kernel_path']}), onnxruntime {p['onnxruntime']}",
             f"**Speed** {s['fps']} frames/s, last judgement {s['latency_ms']} ms",
             f"**Inspections** {s.get('inspections', 0)}, flagged {s.get('flagged', 0)} "
             f"({s.get('flag_rate', 0):.0%}), waiting for review {s.get('review_queue', 0)}",
             f"**Sync** {s.get('outbox_unsent', 0)} records waiting to go to HQ",
             f"**Disk** {s['disk_free_mb']} MB free, dropped frames {s['dropped_frames']}"]
    if s.get("alarm"):
        lines.append(f"**ALARM** {s['alarm']}")
    return "\n\n".join(filter(None, lines))


def next_review(appliance):
    queue = appliance.store.review_queue(limit=1)
    count = appliance.store.stats()["review_queue"]
    if not queue:
        return None, "Nothing to review.", gr.update(choices=[], value=None), None
    row = appliance.store.inspection(queue[0]["id"])
    texts = [s["text"] for s in sorted(row["scores"], key=lambda s: s["rank"])]
    reasons = row.get("flag_reasons") or []
    info = (f"**{count} waiting.** Part #{row['id']} at {row['ts'][:19]}: the model says "
            f"*{row['verdict']}*. Why flagged: {'; '.join(reasons) if isinstance(reasons, list) else reasons}. "
            f"Tap the right explanation:")
    return _stored_frame(appliance, row), info, gr.update(choices=texts, value=None), row["id"]


def log_in(appliance, who, code):
    try:
        ok = appliance.store.check_operator_pin(who.strip(), code.strip())
    except LinejudgeError as exc:
        return None, f"**{exc}**", *next_review(appliance)
    if not ok:
        return None, "**Wrong name or PIN.**", None, "", gr.update(choices=[]), None
    return who.strip(), f"Logged in as **{who.strip()}**.", *next_review(appliance)


def file_review(appliance, who, inspection_id, text):
    if not who:
        return "**Log in first.**", gr.update(), gr.update(), gr.update(), inspection_id
    text = (text or "").strip()
    if inspection_id is None or not text:
        return "", gr.update(), gr.update(), gr.update(), inspection_id
    try:
        chosen = check_explanation(text)
        appliance.store.add_review(inspection_id, who, chosen)
    except LinejudgeError as exc:
        frame, info, update, next_id = next_review(appliance)   # e.g. reviewed elsewhere: move on
        return f"**{exc}**", frame, info, update, next_id
    frame, info, update, next_id = next_review(appliance)
    return f"Saved: part #{inspection_id} is *{chosen}*.", frame, info, update, next_id


def history_rows(appliance, text, which):
    flagged = {"flagged": True, "not flagged": False}.get(which)
    rows = appliance.store.history(verdict_contains=text.strip() or None, flagged=flagged, limit=200)
    return [[r["id"], r["ts"][:19], r["verdict"], round(r["p_best"], 3), bool(r["flagged"]),
             r["model_version"]] for r in rows]


def create_ui(appliance) -> gr.Blocks:
    with gr.Blocks(title="linejudge") as ui:
        operator = gr.State(None)
        current = gr.State(None)
        with gr.Tab("Live"):
            with gr.Row():
                live_frame = gr.Image(label="Current part", interactive=False, height=380)
                with gr.Column():
                    verdict = gr.Markdown(elem_id="verdict")
                    flag = gr.Markdown(elem_id="flag")
                    ranking = gr.Dataframe(headers=["explanation", "score"], interactive=False)
        with gr.Tab("Review"):
            with gr.Row():
                name = gr.Textbox(label="Operator", scale=2)
                pin = gr.Textbox(label="PIN", type="password", scale=1)
                login = gr.Button("Log in", variant="primary", scale=1)
            login_msg = gr.Markdown("Log in to review flagged parts.")
            review_frame = gr.Image(label="Flagged part", interactive=False, height=380)
            review_info = gr.Markdown()
            choices = gr.Radio(label="Right explanation", choices=[], elem_classes="review-choices")
            correction = gr.Textbox(label="Or type the right explanation")
            save_text = gr.Button("Save typed explanation")
            review_msg = gr.Markdown()
        with gr.Tab("History"):
            with gr.Row():
                hist_verdict = gr.Textbox(label="Verdict contains")
                hist_flag = gr.Dropdown(["all", "flagged", "not flagged"], value="all", label="Flag")
                refresh = gr.Button("Show")
            history = gr.Dataframe(headers=["id", "time", "verdict", "p_best", "flagged", "model"],
                                   interactive=False)
        with gr.Tab("Status"):
            status = gr.Markdown()

        timer = gr.Timer(1.0)
        timer.tick(lambda: live_view(appliance), outputs=[live_frame, verdict, ranking, flag])
        timer.tick(lambda: status_view(appliance), outputs=[status])

        login.click(partial(log_in, appliance), [name, pin], [operator, login_msg, review_frame, review_info, choices, current])

        choices.input(partial(file_review, appliance), [operator, current, choices],
                      [review_msg, review_frame, review_info, choices, current])
        save_text.click(partial(file_review, appliance), [operator, current, correction],
                        [review_msg, review_frame, review_info, choices, current])

        refresh.click(partial(history_rows, appliance), [hist_verdict, hist_flag], [history])
    return ui
