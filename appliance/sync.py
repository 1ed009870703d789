"""One sync pass with HQ: send the outbox, fetch and install a newer signed bundle, report.

    sync_once(cfg, store, client=None, swap=None, sleep=time.sleep) -> dict

(a) Outbox, oldest first, in batches of 50. The frames the records name go first (HEAD, then
    PUT if HQ lacks them). Each batch carries an Idempotency-Key derived from its record keys
    and every record its own key, so a retry after a lost response is stored once at HQ. A row
    is marked sent only when HQ answered 2xx and listed its key as accepted.
(b) Model (appliance/model_update.py): a newer signed bundle HQ offers is downloaded,
    verified and staged, then tried by swap(staged_dir, manifest) -> (ok, reason) and kept
    or rejected; a trial with too few frames is "deferred" and tried again next pass.
(c) Status: POST (model version, flag rate, backlog, install result) to HQ.

Transient failures (connection errors, timeouts, 408/429/5xx) are retried with exponential
backoff and full jitter, honouring Retry-After, within max_attempts per request and a time
budget per pass. No failure escapes: the pass returns a result dict with "ok" and "errors".
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import random
import re
import time
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import httpx

from appliance.hq_session import DEFAULT_TIMEOUT, AuthError, HQSession, RetryPolicy, Transient
from appliance import model_update
from appliance.model_update import Swap, golden_check_swap, installed_version
from models.errors import LinejudgeError, ModelError, SyncError
from models import bundle as lib
from models.platform import platform_record

log = logging.getLogger("linejudge.sync")

BATCH_SIZE = 50


# ---------------------------------------------------------------- (a) outbox

def _batch_key(rows: list[dict]) -> str:
    return "batch-" + hashlib.sha256("\n".join(r["idempotency_key"] for r in rows).encode()).hexdigest()[:40]


def _frame_file(store, row: dict, cache: dict) -> tuple[str, Path] | None:
    sha = row["payload"].get("frame_sha256") if isinstance(row["payload"], dict) else None
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        return None
    iid = row.get("inspection_id")
    if iid not in cache:
        found = store.inspection(iid) if iid is not None else None
        cache[iid] = Path(found["frame_file"]) if found and found.get("frame_file") else None
    path = cache[iid]
    return (sha, path) if path is not None and path.is_file() else None


def _upload_frames(s: HQSession, store, rows: list[dict], uploaded: set, cache: dict) -> int:
    """Frames named by the batch's records, before the records; returns how many were sent."""
    count = 0
    for row in rows:
        found = _frame_file(store, row, cache)
        if found is None or found[0] in uploaded:
            continue
        sha, path = found
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            log.warning("frame %s on disk does not match its sha256; not uploading it", path)
            uploaded.add(sha)
            continue
        head = s.request("HEAD", f"/v1/frames/{sha}", f"checking frame {sha[:12]}", allow=(404,))
        if head.status_code == 404:
            s.request("PUT", f"/v1/frames/{sha}", f"uploading frame {sha[:12]}", content=data,
                      headers={"Content-Type": "application/octet-stream"})
            count += 1
        uploaded.add(sha)
    return count


def _send_outbox(s: HQSession, store, appliance_id: str, result: dict) -> None:
    path = f"/v1/appliances/{quote(appliance_id, safe='')}/feedback"
    skipped: set[int] = set()        # rows HQ refused in this pass: leave them, go on with the rest
    uploaded: set[str] = set()
    cache: dict = {}
    while True:
        rows = [r for r in store.unsent_outbox(BATCH_SIZE + len(skipped)) if r["id"] not in skipped][:BATCH_SIZE]
        if not rows:
            return
        result["frames_uploaded"] += _upload_frames(s, store, rows, uploaded, cache)
        ids = [r["id"] for r in rows]

        def post():
            present = set(store.record_attempt(ids))      # rows an operator's Undo took back stay here
            batch = [r for r in rows if r["id"] in present]
            if not batch:
                return set(), []
            records = [{"idempotency_key": r["idempotency_key"], "kind": r["kind"], "payload": r["payload"]}
                       for r in batch]
            resp = s.check(s.client.post(s.base + path, json={"records": records}, timeout=s.timeout,
                                         headers=s.headers({"Idempotency-Key": _batch_key(batch)})),
                           f"sending {len(batch)} outbox rows")
            try:
                body = resp.json()
                return set(body["accepted"]), body.get("rejected") or []
            except (ValueError, KeyError, TypeError):
                raise Transient("HQ's feedback answer is not the expected JSON") from None

        accepted, refused = s.call(f"sending {len(rows)} outbox rows", post)
        sent = [r["id"] for r in rows if r["idempotency_key"] in accepted]
        store.mark_sent(sent)
        result["sent"] += len(sent)
        for row in rows:
            if row["idempotency_key"] not in accepted:
                skipped.add(row["id"])
        if refused:
            result["refused_records"].extend(refused)
            log.warning("HQ refused %d outbox rows: %s", len(refused), refused[:3])


# ---------------------------------------------------------------- (c) status

def _report_status(s: HQSession, cfg, store, appliance_id: str, result: dict, report=None) -> None:
    stats = store.stats()
    model = result["model"]
    body = {"line": cfg.line, "station": cfg.station, "model_version": installed_version(cfg, store),
            "flag_rate": stats["flag_rate"], "backlog": stats["outbox_unsent"],
            "inspections": stats["inspections"], "sync": {"sent": result["sent"], "errors": result["errors"][:5]},
            **(report() if report else {"platform": platform_record()})}
    if model.get("action") in ("installed", "rejected", "refused", "deferred"):
        body["install"] = {"version": model.get("offered"), "reason": model.get("reason", ""),
                           "state": {"installed": "active"}.get(model["action"], model["action"])}
    s.request("POST", f"/v1/appliances/{quote(appliance_id, safe='')}/status", "reporting status", json=body)
    result["status_reported"] = True


# ---------------------------------------------------------------- the pass

@contextlib.contextmanager
def _pass_lock(state_dir: Path):
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(state_dir) / "sync.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_token(cfg) -> str:
    if not cfg.hq_url:
        raise SyncError("hq_url is not set in the appliance config; set it to sync with HQ")
    if not cfg.hq_token_file:
        raise SyncError("hq_token_file is not set in the appliance config; put the token from "
                        "'linejudge hq add-appliance' in a file and name it there")
    try:
        token = Path(cfg.hq_token_file).read_text().strip()
    except OSError as exc:
        raise SyncError(f"cannot read hq_token_file {cfg.hq_token_file}: {exc}") from None
    if not token:
        raise SyncError(f"hq_token_file {cfg.hq_token_file} is empty")
    return token


def _run_phase(name: str, fn, result: dict) -> bool:
    """Run one phase; failures go into result["errors"]. False if the pass should stop."""
    try:
        fn()
        return True
    except AuthError as exc:
        result["errors"].append(f"{name}: {exc}")
        log.warning("sync %s: %s", name, exc)
        return False
    except (SyncError, ModelError) as exc:
        result["errors"].append(f"{name}: {exc}")
    except (lib.BundleError, LinejudgeError, httpx.HTTPError, OSError) as exc:
        result["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
    except Exception as exc:  # never into the inspection loop
        log.exception("sync %s failed", name)
        result["errors"].append(f"{name}: unexpected {type(exc).__name__}: {exc}")
    log.warning("sync %s: %s", name, result["errors"][-1])
    return True


def sync_once(cfg, store, *, client: httpx.Client | None = None, swap: Swap | None = None,
              sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
              rng: random.Random | None = None, policy: RetryPolicy = RetryPolicy(),
              timeout: httpx.Timeout = DEFAULT_TIMEOUT, retry_rejected: bool = False,
              update_model: bool = True, report: Callable[[], dict] | None = None) -> dict:
    """One pass: outbox -> HQ, newer bundle -> install via swap, status -> HQ. Never raises.

    swap(staged_dir, manifest) -> (ok, reason) is supplied by the running appliance (load the
    new runtime, golden-set check, hot swap); without it golden_check_swap(cfg) is used.
    report() -> the running model's precision, golden-set check and platform, sent with the
    status (without it, the status carries this machine's platform record only).
    """
    started = time.monotonic()
    result = {"ok": False, "sent": 0, "pending": None, "frames_uploaded": 0, "refused_records": [],
              "model": {"action": "not checked"}, "status_reported": False, "errors": [],
              "requests": 0, "failures": 0, "slept_s": 0.0}
    own_client = None
    try:
        with _pass_lock(cfg.state_dir) as locked:
            if not locked:
                result.update(ok=True, skipped="another sync pass is running")
                return result
            token = _read_token(cfg)
            own_client = client is None and httpx.Client(timeout=timeout, follow_redirects=False)
            s = HQSession(client or own_client, cfg.hq_url, token, policy=policy, sleep=sleep, clock=clock,
                         rng=rng or random.Random(), timeout=timeout)
            ident = {"id": token.rsplit(".", 1)[0] if "." in token else None}

            def whoami():
                if ident["id"] is None:
                    ident["id"] = s.request("GET", "/v1/whoami", "asking HQ who this appliance is").json()["appliance_id"]

            go = _run_phase("identify", whoami, result)
            go = go and _run_phase("outbox", lambda: _send_outbox(s, store, ident["id"], result), result)
            if go and update_model:
                go = _run_phase("model", lambda: model_update.update_model(s, cfg, store, swap or golden_check_swap(cfg),
                                                               result["model"], retry_rejected), result)
                if result["model"]["action"] == "not checked":
                    result["model"].update(action="error", reason=result["errors"][-1] if result["errors"] else "")
            if go and ident["id"]:
                _run_phase("status", lambda: _report_status(s, cfg, store, ident["id"], result, report), result)
            result.update(requests=s.requests, failures=s.failures, slept_s=round(s.slept, 3))
    except Exception as exc:  # token, lock or anything before the phases
        result["errors"].append(f"{type(exc).__name__}: {exc}" if not isinstance(exc, SyncError) else str(exc))
    finally:
        if own_client:
            own_client.close()
    with contextlib.suppress(Exception):
        result["pending"] = store.stats()["outbox_unsent"]
    result["ok"] = not result["errors"]
    result["elapsed_s"] = round(time.monotonic() - started, 3)
    return result
