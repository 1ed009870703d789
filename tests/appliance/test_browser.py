"""The touchscreen in a real headless Chromium: Live updates, PIN login, one-tap review.

Needs Debian's chromium at /usr/bin/chromium (`make browser` installs it); skips without it.
The appliance replays a folder of frames through the tiny bundle; every inspection is
flagged (p_best threshold 0.999), so the review queue always has work.
"""
import re
import socket
import sqlite3
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from appliance.ui import DEBOUNCE_S
from tests.helpers import wait_for

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path("/tmp/linejudge_ui.png")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="no /usr/bin/chromium (run `make browser` to install Debian chromium)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_bundle, tmp_path_factory):
    import uvicorn
    from appliance.config import config_from_dict
    from appliance.server import build_app
    from appliance.service import Appliance

    bundle, public, _ = tiny_bundle
    frames = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(1)
    for i in range(4):
        frame = rng.integers(60, 200, (160, 160), np.uint8)
        cv2.line(frame, (10, 20 + 30 * i), (150, 140 - 20 * i), 10, 3)     # a "crack", different each frame
        cv2.imwrite(str(frames / f"f{i}.png"), frame)
    port = _free_port()
    cfg = config_from_dict({"state_dir": str(tmp_path_factory.mktemp("state")), "bundle": str(bundle),
                            "trusted_keys": [str(public)], "source": str(frames), "max_fps": 2,
                            "operator_pins": {"ana": "2468", "bo": "1357"}, "thresholds": {"p_best": 0.999},
                            "review": {"cap_per_hour": None},          # every flagged part may be reviewed
                            "port": port})
    appliance = Appliance(cfg)
    appliance.start()
    server = uvicorn.Server(uvicorn.Config(build_app(appliance), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and thread.is_alive() and time.time() < deadline:
        time.sleep(0.1)
    assert server.started, "uvicorn did not start"
    try:
        yield appliance, f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        appliance.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        expect.set_options(timeout=30_000)     # expect() keeps its own 5 s default otherwise
        yield launched
        launched.close()


def new_page(browser, width: int, height: int):
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(30_000)
    # The appliance works offline: anything not served by it (web fonts, CDNs) is refused at once.
    context.route(re.compile(r"^(?!http://127\.0\.0\.1[:/]).*"), lambda route: route.abort())
    return context.new_page()


@pytest.fixture(scope="module")
def page(browser):
    return new_page(browser, 1280, 800)


def _verdict_id(page) -> int | None:
    match = re.search(r"#(\d+)", page.locator("#verdict").inner_text())
    return int(match.group(1)) if match else None


def _wait_for(predicate, timeout=15.0, what="condition"):
    return wait_for(predicate, timeout, what, every=0.25)


def test_touchscreen_live_login_and_one_tap_review(served, page):
    from playwright.sync_api import expect
    appliance, url = served
    page.goto(url, wait_until="domcontentloaded")

    # Live: the verdict shows an inspection id, then a later one (the 1 s timer keeps it current).
    first = _wait_for(lambda: _verdict_id(page), what="a first verdict on Live")
    later = _wait_for(lambda: (_verdict_id(page) or 0) > first and _verdict_id(page), what="a later verdict")
    assert later > first
    page.screenshot(path="/tmp/linejudge_live.png")

    # Review: a wrong PIN is refused, the right one shows the first flagged part.
    page.get_by_role("tab", name="Review").click()
    page.get_by_label("Operator").fill("ana")
    page.get_by_label("PIN").fill("0000")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_text("Wrong name or PIN")).to_be_visible()

    page.get_by_label("PIN").fill("2468")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_text("Logged in as")).to_be_visible()
    part = page.get_by_text(re.compile(r"Part #\d+ at"))
    expect(part).to_be_visible()
    inspection_id = int(re.search(r"Part #(\d+)", part.inner_text()).group(1))
    choices = page.get_by_role("radiogroup", name="Right explanation")
    if not choices.count():           # older Gradio: a fieldset labelled by its legend
        choices = page.locator("fieldset", has_text="Right explanation")
    options = choices.get_by_role("radio")
    expect(options.first).to_be_visible()
    assert options.count() >= 2
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    # One tap files the review.
    chosen = options.first.locator("xpath=ancestor::label[1]").inner_text().strip()
    options.first.locator("xpath=ancestor::label[1]").click()
    expect(page.get_by_text(f"Saved: part #{inspection_id} is")).to_be_visible()
    page.screenshot(path="/tmp/linejudge_review_saved.png", full_page=True)

    with sqlite3.connect(appliance.cfg.db_path) as db:
        reviews = db.execute("SELECT operator, chosen_text FROM reviews WHERE inspection_id = ?",
                             [inspection_id]).fetchall()
        kinds = {k for (k,) in db.execute("SELECT kind FROM outbox WHERE inspection_id = ?", [inspection_id])}
    assert reviews == [("ana", chosen)]
    assert kinds == {"review", "preference"}

    # Another tablet reviews the part now on screen first: a tap here is refused, naming who,
    # and nothing contradicting bob's review is stored or sent.
    part = page.get_by_text(re.compile(rf"Part #(?!{inspection_id}\b)\d+ at"))
    expect(part).to_be_visible()
    shown = int(re.search(r"Part #(\d+)", part.inner_text()).group(1))
    appliance.store.add_review(shown, "bob", "no defect seen by bob")
    time.sleep(DEBOUNCE_S)            # ana's next tap comes later than a double tap's second one
    options.first.locator("xpath=ancestor::label[1]").click()
    expect(page.get_by_text(f"part #{shown} was already reviewed by bob")).to_be_visible()
    with sqlite3.connect(appliance.cfg.db_path) as db:
        assert db.execute("SELECT operator FROM reviews WHERE inspection_id = ?", [shown]).fetchall() == [("bob",)]


def _log_in(page, who="ana", pin="2468"):
    from playwright.sync_api import expect
    page.get_by_role("tab", name="Review").click()
    page.get_by_label("Operator").fill(who)
    page.get_by_label("PIN").fill(pin)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_text("Logged in as")).to_be_visible()


def _shown_part(page, other_than: int | None = None) -> int:
    from playwright.sync_api import expect
    pattern = rf"Part #(?!{other_than}\b)\d+ at" if other_than else r"Part #\d+ at"
    part = page.get_by_text(re.compile(pattern))
    expect(part).to_be_visible()
    return int(re.search(r"Part #(\d+)", part.inner_text()).group(1))


def _choice_labels(page):
    choices = page.get_by_role("radiogroup", name="Right explanation")
    if not choices.count():
        choices = page.locator("fieldset", has_text="Right explanation")
    return choices.get_by_role("radio").locator("xpath=ancestor::label[1]")


def _on_screen(box, width, height) -> bool:
    return box is not None and box["x"] >= 0 and box["y"] >= 0 and \
        box["x"] + box["width"] <= width + 1 and box["y"] + box["height"] <= height + 1


def _reviews(appliance, inspection_id) -> list[tuple]:
    with sqlite3.connect(appliance.cfg.db_path) as db:
        return db.execute("SELECT operator, chosen_text FROM reviews WHERE inspection_id = ?",
                          [inspection_id]).fetchall()


@pytest.mark.parametrize("width, height", [(1280, 800), (1024, 600)])
def test_one_screen_double_tap_undo_and_logout(served, browser, width, height):
    """Frame and every choice on one screen without scrolling; a double tap files exactly one
    review, on the part shown; Undo takes it back; Log out hides the choices."""
    from playwright.sync_api import expect
    appliance, url = served
    page = new_page(browser, width, height)
    page.goto(url, wait_until="domcontentloaded")
    _log_in(page)
    shown = _shown_part(page)
    labels = _choice_labels(page)
    expect(labels.first).to_be_visible()
    page.screenshot(path=f"/tmp/linejudge_review_{width}x{height}.png")
    frame = page.locator("#review-frame").bounding_box()
    assert _on_screen(frame, width, height), f"frame {frame} is not on a {width}x{height} screen"
    for i in range(labels.count()):
        box = labels.nth(i).bounding_box()
        assert _on_screen(box, width, height), f"choice {i} {box} is not on a {width}x{height} screen"
    order = [labels.nth(i).inner_text().strip() for i in range(labels.count())]

    labels.first.dblclick()
    expect(page.get_by_text(f"Saved: part #{shown} is")).to_be_visible()
    following = _shown_part(page, other_than=shown)
    time.sleep(1.5)                                      # any late second tap has landed by now
    assert _reviews(appliance, shown) == [("ana", order[0])]
    assert _reviews(appliance, following) == []          # the second tap did not label the next part
    assert [labels.nth(i).inner_text().strip() for i in range(labels.count())] == order   # same order

    page.get_by_role("button", name="Undo last review").click()
    expect(page.get_by_text(f"Undone: part #{shown} is waiting for a review again")).to_be_visible()
    expect(page.get_by_text(re.compile(rf"Part #{shown} at"))).to_be_visible()       # shown again to review
    assert _reviews(appliance, shown) == []
    with sqlite3.connect(appliance.cfg.db_path) as db:
        assert db.execute("SELECT count(*) FROM outbox WHERE inspection_id = ?", [shown]).fetchone() == (0,)

    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_text("Logged out.")).to_be_visible()
    expect(labels.first).to_be_hidden()
    expect(page.get_by_role("button", name="Log in")).to_be_visible()
    page.context.close()


def test_ok_ng_and_review_look_different_in_words_and_colour(served, page):
    from playwright.sync_api import expect
    from appliance.ui import state_badge
    _, url = served
    page.goto(url, wait_until="domcontentloaded")
    expect(page.locator("#state")).to_contain_text("REVIEW")      # every part is flagged in this fixture
    looks = page.evaluate("""(badges) => badges.map((markup) => {
        const holder = document.createElement('div'); holder.innerHTML = markup;
        document.querySelector('#state').appendChild(holder);
        const badge = holder.firstElementChild, style = getComputedStyle(badge);
        return [badge.innerText.split(/\\s+/)[0], style.backgroundColor, style.color]; })""",
                          [state_badge(s) for s in ("ok", "ng", "review")])
    assert [word for word, _, _ in looks] == ["OK", "NG", "REVIEW"]
    assert len({background for _, background, _ in looks}) == 3, looks
    assert all(colour == "rgb(255, 255, 255)" for _, _, colour in looks)


def test_the_camera_lost_banner_appears_when_the_source_dies(served, page):
    """Last in this module: it stops the shared appliance's camera."""
    from playwright.sync_api import expect
    from models.errors import CaptureError
    appliance, url = served
    page.goto(url, wait_until="domcontentloaded")
    expect(page.locator("#state")).to_contain_text("REVIEW")
    expect(page.locator("#alarms")).not_to_contain_text("Camera lost")

    def dead():
        raise CaptureError("the camera stopped answering")
    appliance._grabber.source.read = dead
    expect(page.locator("#alarms")).to_contain_text("Camera lost: no picture for", timeout=20_000)
    expect(page.locator("#alarms")).to_contain_text("The verdict on screen is")
    page.screenshot(path="/tmp/linejudge_camera_lost.png")
