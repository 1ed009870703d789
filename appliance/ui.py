"""The operator touchscreen (Gradio): Live, Review, History, Status.

Made for gloved hands on a 1280x800 or 1024x600 screen: every part's state is OK (green),
NG (red) or REVIEW (amber), always in words as well as colour; the frame is large with a
full-screen zoom, and in Review the choices sit beside it. One tap on the right explanation
files a review for the part shown; a second tap within DEBOUNCE_S is ignored, so a double tap
cannot label the next part, and the last review can be undone for UNDO_S. The choices keep the
catalog's order for every part. Reviews need an operator logged in with a PIN; the review
panel is hidden otherwise, and a session ends with Log out or after operator_idle_logout_s
without a tap. Alarms (appliance/alarms.py) are a banner on Live and Status. Frames are shown
as pixels, never as paths into the state directory; times are local.
"""
from __future__ import annotations

import base64
import html
import math
import time
from datetime import datetime
from functools import partial

import cv2
import gradio as gr
import numpy as np

from appliance.alarms import current_alarms, verdict_age
from appliance.decide import outcome as part_state
from models.errors import LinejudgeError
from models.preprocess import check_explanation

DEBOUNCE_S = 1.0        # a second tap this soon after a saved review is ignored
UNDO_S = 20.0           # the last review can be undone for this long
STATES = {"ok": ("OK", "no defect seen"), "ng": ("NG", "defective part"),
          "review": ("REVIEW", "an operator must look")}

CSS = """
.gradio-container {font-size: 20px}
footer {display: none !important}
button, .gr-button {min-height: 64px !important; font-size: 22px !important}
input[type=text], input[type=password], textarea {font-size: 22px !important; min-height: 56px}
#verdict, #verdict p {font-size: 28px !important; font-weight: 700}
.state {font-size: 44px; font-weight: 800; padding: 12px 20px; border-radius: 12px; color: #fff}
.state small {display: block; font-size: 22px; font-weight: 600}
#details, #details p, #details li {font-size: 20px}
.state-ok {background: #15803d} .state-ng {background: #b91c1c} .state-review {background: #b45309}
.state-none {background: #6b7280}
#alarms .alarm {font-size: 24px; font-weight: 700; background: #fee2e2; color: #7f1d1d;
                border: 4px solid #b91c1c; border-radius: 10px; padding: 10px 16px; margin-bottom: 8px}
#alarms .age {font-size: 20px; color: #374151}
#review-msg, #review-msg p {font-size: 28px !important; font-weight: 700}
.review-choices label {min-height: 64px; font-size: 22px !important; padding: 12px !important}
.history td, .history th {font-size: 20px; padding: 6px 10px; text-align: left}
.history img {width: 72px; height: 72px}
.review-choices .wrap {display: grid !important; grid-template-columns: 1fr 1fr; gap: 8px}
#review-frame img, #live-frame img {width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated}
#review-info, #review-info p {font-size: 18px !important; line-height: 1.3}
@media (max-height: 700px) {
  .gradio-container {font-size: 16px}
  button, .gr-button {min-height: 52px !important; font-size: 18px !important}
  .review-choices label {min-height: 52px; font-size: 16px !important; padding: 4px 8px !important;
                         line-height: 1.2}
  .review-choices .wrap {gap: 4px}
  #review-msg, #review-msg p {font-size: 20px !important}
  #review-info, #review-info p {font-size: 15px !important}
  #verdict, #verdict p {font-size: 22px !important}
  .state {font-size: 32px; padding: 6px 12px}
}
"""

PLAIN_REASONS = {
    "low confidence": "the model is unsure between two explanations",
    "unusual frame": "this picture looks unlike the parts the model has learned",
    "image barely matters": "the answer hardly depends on the picture",
    "possible defect": "the model says OK but sees a real chance of a defect",
}


def plain_reason(reason: str) -> str:
    """A flag reason in words for the operator (the technical one stays in the log and API)."""
    for start, words in PLAIN_REASONS.items():
        if reason.startswith(start):
            return words
    return reason


def local_time(ts: str) -> str:
    """A stored UTC timestamp as local wall-clock time (with the date if not today)."""
    moment = datetime.fromisoformat(ts).astimezone()
    return moment.strftime("%H:%M:%S" if moment.date() == datetime.now().astimezone().date() else "%d %b %H:%M")


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


_HEAT_CACHE: dict[tuple[int, int], np.ndarray] = {}     # (appliance, inspection id) -> overlaid frame


def with_heat_map(appliance, frame: np.ndarray, ranking: list[tuple[str, float]], key: int | None = None):
    """The frame (RGB) with where the verdict comes from laid over it: red where the patches
    support it most (appliance.runtime.heat_map); the plain frame where there is nothing to show."""
    cached = _HEAT_CACHE.get((id(appliance), key)) if key is not None else None
    if cached is not None:
        return cached
    rgb = _rgb(frame)
    heat = appliance.runtime.heat_map(frame, ranking)
    if heat is None or heat.max() <= 0:
        return rgb
    h, w = rgb.shape[:2]
    support = cv2.resize((heat.clip(0, None) / heat.max()).astype(np.float32), (w, h),
                         interpolation=cv2.INTER_CUBIC).clip(0, 1)
    colour = cv2.applyColorMap((support * 255).astype(np.uint8), cv2.COLORMAP_JET)[:, :, ::-1]
    alpha = (0.45 * support)[..., None]
    shown = (rgb * (1 - alpha) + colour * alpha).astype(np.uint8)
    if key is not None:
        _HEAT_CACHE.clear()
        _HEAT_CACHE[(id(appliance), key)] = shown
    return shown


def state_badge(state: str | None) -> str:
    if state is None:
        return '<div class="state state-none">WAITING <small>for the first part</small></div>'
    word, meaning = STATES[state]
    return f'<div class="state state-{state}" data-state="{state}">{word} <small>{meaning}</small></div>'


def alarm_banner(appliance, alarms=None) -> str:
    """alarms: [{"kind", "text"}] as Appliance.status() has them already; None = look now."""
    if alarms is None:
        alarms = [{"kind": a.kind, "text": a.text} for a in current_alarms(appliance)]
    if not alarms:
        return ""
    age = verdict_age(appliance)
    lines = [f'<div class="alarm" data-kind="{a["kind"]}">{html.escape(a["text"])}</div>' for a in alarms]
    lines.append(f'<div class="age">The verdict on screen is {age} old.</div>' if age else
                 '<div class="age">No part has been inspected yet.</div>')
    return "".join(lines)


FACT_WORDS = {"defective": {True: "a defect", False: "no defect"},
              "type": {"mono": "a monocrystalline cell", "poly": "a polycrystalline cell"}}


def fact_phrases(appliance, ranking) -> list[str]:
    """Which facts of the verdict the picture supports (50 % or more) and which it doubts."""
    phrases = []
    for fact, value, p in appliance.runtime.fact_support(ranking):
        words = FACT_WORDS.get(fact, {}).get(value) or (f"defect level {round(value * 3)} of 3" if fact == "level"
                                                        else f"{fact} {value}")
        phrases.append(f"{'supports' if p >= 0.5 else 'doubts'} {words} ({p:.0%})")
    return phrases


def facts_html(appliance, ranking) -> str:
    items = "".join(f"<li>{html.escape(p)}</li>" for p in fact_phrases(appliance, ranking))
    return f"<p>The picture:</p><ul>{items}</ul>" if items else ""


def live_view(appliance, show_heat: bool = True):
    """Live tab: (frame, alarm banner, state badge, verdict, details); show_heat lays where the
    verdict comes from over the frame."""
    live, banner = appliance.live, alarm_banner(appliance)
    if live.judgement is None:
        return None, banner, state_badge(None), "", ""
    d = live.judgement.decision
    state = part_state(d.flagged, appliance.runtime.is_defective(d.verdict))
    why = "; ".join(plain_reason(r) for r in d.reasons)
    others = "".join(f"<li>{html.escape(t)}</li>" for t, _ in d.ranking[1:4])
    details = (f"<p>Why it needs a look: {html.escape(why)}.</p>" if d.flagged else "") + \
              facts_html(appliance, d.ranking) + \
              (f"<p>Also possible:</p><ul>{others}</ul>" if others else "") + \
              f"<p>{live.fps:.1f} parts a second</p>"
    frame = with_heat_map(appliance, live.frame, d.ranking, live.inspection_id) if show_heat else _rgb(live.frame)
    return frame, banner, state_badge(state), f"Part #{live.inspection_id}: {d.verdict}", details


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


def _budget_line(budget: dict | None) -> str:
    if not budget:
        return ""
    hour = f"{budget['offered_last_hour']}" + (f" of {budget['cap_per_hour']}" if budget["cap_per_hour"] else "")
    shift = f"{budget['offered_this_shift']}" + (f" of {budget['cap_per_shift']}" if budget["cap_per_shift"] else "")
    age = f"; a part waits at most {budget['max_age_s']:g} s" if budget["max_age_s"] else ""
    return f"**Review budget** parts offered in the last hour {hour}, this shift {shift}{age}"


def status_view(appliance) -> tuple[str, str, str]:
    """Status tab: (alarm banner, the shift in plain words, details for the engineer)."""
    s = appliance.status()
    p = s["platform"]
    shift = "\n\n".join(filter(None, [
        f"**Parts inspected** {s.get('inspections', 0)}, of which {s.get('flagged', 0)} "
        f"({s.get('flag_rate', 0):.0%}) needed a look; waiting for review now: {s.get('review_queue', 0)}",
        _budget_line(s.get("review_budget")),
        f"**Speed** {s['fps']} parts a second",
        f"**To HQ** {s.get('outbox_unsent', 0)} records waiting to be sent"]))
    engineer = "\n\n".join(filter(None, [
        f"**Model** v{s['model_version']} on {s['provider']}, {s['precision'].upper()}",
        _golden_line(s["golden"]),
        f"**Computer** {p['cpu']} ({p['machine']}; {' '.join(p['isa']) or 'no AVX2/AVX-512/NEON'}; "
        f"INT8 path: {p['int8_kernel_path']}), onnxruntime {p['onnxruntime']}",
        f"**Latency** last judgement {s['latency_ms']} ms",
        f"**Disk** {s['disk_free_mb']} MB free, dropped frames {s['dropped_frames']}",
        f"**Store alarm** {s['alarm']}" if s.get("alarm") else ""]))
    return alarm_banner(appliance, s["alarms"]), shift, engineer


def history_html(appliance, limit: int = 50) -> str:
    """The latest parts, newest first, with a thumbnail, state and review; read-only."""
    rows = appliance.store.history(limit=limit)
    body = []
    for r in rows:
        state = part_state(r["flagged"], appliance.runtime.is_defective(r["verdict"]))
        reviewed = appliance.store.reviews_of(r["id"])
        review = (f"reviewed by {html.escape(reviewed[0]['operator'])}: {html.escape(reviewed[0]['chosen_text'])}"
                  if reviewed else ("waiting" if r["queued"] else ""))
        body.append(f"<tr><td>{_thumbnail(appliance, r)}</td><td>#{r['id']}</td><td>{local_time(r['ts'])}</td>"
                    f"<td>{STATES[state][0]}</td><td>{html.escape(r['verdict'])}</td><td>{review}</td></tr>")
    head = "<tr><th></th><th>part</th><th>time</th><th>state</th><th>verdict</th><th>review</th></tr>"
    return f'<table class="history">{head}{"".join(body)}</table>' if body else "<p>No parts yet.</p>"


def _thumbnail(appliance, row: dict) -> str:
    frame = _stored_frame(appliance, row)
    if frame is None:
        return ""
    small = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), (72, 72), interpolation=cv2.INTER_AREA)
    data = base64.b64encode(cv2.imencode(".png", small)[1].tobytes()).decode()
    return f'<img alt="part #{row["id"]}" src="data:image/png;base64,{data}">'


# ---------------------------------------------------------------- review


def _choices_in_catalog_order(appliance, row: dict) -> list[str]:
    """The same order for every part (the catalog's), free-text candidates after it."""
    order = {t: i for i, t in enumerate(appliance.runtime.catalog.displays)}
    return sorted((s["text"] for s in row["scores"]), key=lambda t: (order.get(t, len(order)), t))


def next_review(appliance, inspection_id: int | None = None):
    """(frame, info, choices update, inspection id) for the part at the head of the queue (or
    the part given, e.g. the one whose review was just undone)."""
    if inspection_id is None:
        queue = appliance.store.review_queue(limit=1)
        if not queue:
            return None, "Nothing to review.", gr.update(choices=[], value=None), None
        inspection_id = queue[0]["id"]
    count = appliance.store.stats()["review_queue"]
    row = appliance.store.inspection(inspection_id)
    reasons = "; ".join(plain_reason(r) for r in row.get("flag_reasons") or [])
    ranking = [(s["text"], s["score"]) for s in row["scores"]]
    facts = "; ".join(fact_phrases(appliance, ranking))
    info = (f"**{count} waiting.** Part #{row['id']} at {local_time(row['ts'])}: the model says "
            f"*{row['verdict']}*" + (f" (the picture {facts})" if facts else "") +
            f". Why it needs a look: {reasons}. Tap the right explanation:")
    frame = _stored_frame(appliance, row)
    if frame is not None:
        frame = with_heat_map(appliance, frame[:, :, ::-1], ranking)
    return frame, info, gr.update(choices=_choices_in_catalog_order(appliance, row), value=None), row["id"]


def _session_alive(appliance, session: dict | None) -> bool:
    return bool(session) and time.monotonic() - session["seen"] < appliance.cfg.operator_idle_logout_s


def log_in(appliance, who, code):
    """-> session, login message, login row, panel, PIN box, frame, info, choices, current, last review."""
    who = (who or "").strip()
    try:
        ok = appliance.store.check_operator_pin(who, (code or "").strip())
    except LinejudgeError as exc:
        return log_out(f"**{exc}**")
    if not ok:
        return log_out("**Wrong name or PIN.**")
    return ({"name": who, "seen": time.monotonic()}, f"Logged in as **{who}**.", gr.update(visible=False),
            gr.update(visible=True), "", *next_review(appliance), None)


def log_out(message: str = "Logged out."):
    """-> session, login message, login row, panel, PIN box, frame, info, choices, current, last
    review (forgotten: the next operator on this tablet cannot undo it)."""
    return (None, message, gr.update(visible=True), gr.update(visible=False), "", None, "",
            gr.update(choices=[], value=None), None, None)


def file_review(appliance, session, inspection_id, text, last):
    """-> message, frame, info, choices, current, session, last review, typed text."""
    unchanged = (gr.update(),) * 5
    if not _session_alive(appliance, session):      # an expired session: the timer logs it out and hides the panel
        return "**Log in first.**", *unchanged[:4], session, last, gr.update()
    if last and time.monotonic() - last["at"] < DEBOUNCE_S:
        return *unchanged, session, last, gr.update()          # the second tap of a double tap
    text = (text or "").strip()
    if inspection_id is None or not text:
        return "", *unchanged[:4], session, last, gr.update()
    session = {**session, "seen": time.monotonic()}
    try:
        chosen = check_explanation(text)
        review_id = appliance.store.add_review(inspection_id, session["name"], chosen)
    except LinejudgeError as exc:
        return f"**{exc}**", *next_review(appliance), session, last, gr.update()   # e.g. reviewed elsewhere
    last = {"review_id": review_id, "inspection_id": inspection_id, "at": time.monotonic()}
    return (f"Saved: part #{inspection_id} is *{chosen}*.", *next_review(appliance), session, last, "")


def undo_review(appliance, session, last):
    """-> message, frame, info, choices, current, last review."""
    if not _session_alive(appliance, session) or not last:
        return "Nothing to undo.", *(gr.update(),) * 4, last
    if time.monotonic() - last["at"] > UNDO_S:
        return f"Too late to undo: a review can be undone for {UNDO_S:g} s.", *(gr.update(),) * 4, None
    try:
        appliance.store.undo_review(last["review_id"])
    except LinejudgeError as exc:
        return f"**{exc}**", *(gr.update(),) * 4, None
    frame, info, choices, current = next_review(appliance, last["inspection_id"])
    return f"Undone: part #{last['inspection_id']} is waiting for a review again.", frame, info, choices, current, None


def check_session(appliance, session):
    """The timer: end a session idle for operator_idle_logout_s (log_out's outputs)."""
    if session and not _session_alive(appliance, session):
        minutes = math.ceil(appliance.cfg.operator_idle_logout_s / 60)
        return log_out(f"Logged out after {minutes} min without a tap; log in again to review.")
    return (session, *(gr.update(),) * 9)


def create_ui(appliance) -> gr.Blocks:
    with gr.Blocks(title="linejudge") as ui:
        session, current, last = gr.State(None), gr.State(None), gr.State(None)
        with gr.Tab("Live"):
            live_alarms = gr.HTML(elem_id="alarms")
            with gr.Row():
                live_frame = gr.Image(label="Current part", interactive=False, height=460, scale=3,
                                      buttons=["fullscreen"], elem_id="live-frame")
                with gr.Column(scale=2):
                    show_heat = gr.Checkbox(value=True, label="Show where the model looks (red: what it sees)")
                    state = gr.HTML(elem_id="state")
                    verdict = gr.Markdown(elem_id="verdict")
                    details = gr.HTML(elem_id="details")
        with gr.Tab("Review"):
            login_msg = gr.Markdown("Log in to review parts.", elem_id="login-msg")
            with gr.Row() as login_row:
                name = gr.Textbox(label="Operator", scale=2)
                pin = gr.Textbox(label="PIN", type="password", scale=1)
                login = gr.Button("Log in", variant="primary", scale=1)
            with gr.Row(visible=False) as panel:
                review_frame = gr.Image(label="Part to review", interactive=False, height=420, scale=2,
                                        buttons=["fullscreen"], elem_id="review-frame")
                with gr.Column(scale=3):
                    review_msg = gr.Markdown(elem_id="review-msg")
                    review_info = gr.Markdown(elem_id="review-info")
                    choices = gr.Radio(label="Right explanation", choices=[], elem_classes="review-choices")
                    with gr.Row():
                        undo = gr.Button("Undo last review")
                        logout = gr.Button("Log out")
                    with gr.Row():
                        correction = gr.Textbox(label="Or type the right explanation", scale=3)
                        save_text = gr.Button("Save typed", scale=1)
        with gr.Tab("History") as history_tab:
            refresh = gr.Button("Show the latest parts")
            history = gr.HTML()
        with gr.Tab("Status"):
            status_alarms = gr.HTML(elem_id="status-alarms")
            shift = gr.Markdown()
            with gr.Accordion("Details for the engineer", open=False):
                engineer = gr.Markdown()

        review_out = [review_frame, review_info, choices, current]
        timer = gr.Timer(1.0)
        timer.tick(partial(live_view, appliance), [show_heat], [live_frame, live_alarms, state, verdict, details])
        timer.tick(partial(status_view, appliance), outputs=[status_alarms, shift, engineer])
        signed = [session, login_msg, login_row, panel, pin, *review_out, last]
        gr.Timer(5.0).tick(partial(check_session, appliance), [session], signed)
        login.click(partial(log_in, appliance), [name, pin], signed)
        logout.click(log_out, None, signed)
        filed = [review_msg, *review_out, session, last, correction]
        choices.input(partial(file_review, appliance), [session, current, choices, last], filed)
        save_text.click(partial(file_review, appliance), [session, current, correction, last], filed)
        undo.click(partial(undo_review, appliance), [session, last], [review_msg, *review_out, last])
        for event in (refresh.click, history_tab.select):
            event(partial(history_html, appliance), None, [history])
    return ui
