"""One sync pass with HQ: send the outbox, fetch and install a newer signed bundle, report.

    sync_once(cfg, store, client=None, swap=None, sleep=time.sleep) -> dict

(a) Outbox, oldest first, in batches of 50. The frames the records name go first (HEAD, then
    PUT if HQ lacks them). Each batch carries an Idempotency-Key derived from its record keys
    and every record its own key, so a retry after a lost response is stored once at HQ. A row
    is marked sent only when HQ answered 2xx and listed its key as accepted.
(b) Model: GET the line's latest manifest; if its version is above the installed one, check
    the manifest signature, download the files (resumable with HTTP Range, each capped at its
    manifest size, all together at 500 MB) into state/downloads/, stage them
    (models_install.stage verifies signature, hashes, line and version), then call
    swap(staged_dir, manifest) -> (ok, reason). ok: switch `current`, record the version
    active. Not ok: record it rejected; the old model keeps serving and the version is not
    tried again (HQ publishes a higher one). A swap that raises TrialInconclusive (too few
    frames came during the trial) records nothing here and reports "deferred" to HQ: the
    version is downloaded and tried again on the next pass.
(c) POST status (model version, flag rate, backlog, install result) to HQ.

Transient failures (connection errors, timeouts, 408/429/5xx) are retried with exponential
backoff and full jitter, honouring Retry-After, within max_attempts per request and a time
budget per pass. No failure escapes: the pass returns a result dict with "ok" and "errors".
"""
from __future__ import annotations

import contextlib
import email.utils
import fcntl
import hashlib
import json
import logging
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import httpx

from appliance import models_install
from appliance.errors import LinejudgeError, ModelError, SyncError, TrialInconclusive
from models import bundle as lib
from models.platform import platform_record

log = logging.getLogger("linejudge.sync")

BATCH_SIZE = 50
MAX_BUNDLE_BYTES = 500 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_SIGNATURE_BYTES = 64 * 1024
DEFAULT_TIMEOUT = httpx.Timeout(5.0, read=15.0)
RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
USER_AGENT = "linejudge-appliance-sync/1"

Swap = Callable[[Path, dict], "tuple[bool, str]"]


@dataclass(frozen=True)
class RetryPolicy:
    base_s: float = 0.5             # backoff: uniform(0, min(cap_s, base_s * 2**attempt))
    cap_s: float = 30.0
    max_attempts: int = 6           # per request
    budget_s: float = 180.0         # per pass, sleeps included
    max_retry_after_s: float = 120.0


class _AuthError(SyncError):
    """HQ refused the token (401/403): retrying this pass cannot help."""


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time()) if when else None


class _Session:
    """HTTP with retries, backoff and the pass's time budget."""

    def __init__(self, client: httpx.Client, base_url: str, token: str, *, policy: RetryPolicy,
                 sleep, clock, rng: random.Random, timeout):
        self.client, self.base, self.token = client, base_url.rstrip("/"), token
        self.policy, self.sleep, self.clock, self.rng, self.timeout = policy, sleep, clock, rng, timeout
        self.started = clock()
        self.requests = self.failures = 0
        self.slept = 0.0

    def remaining(self) -> float:
        return self.policy.budget_s - (self.clock() - self.started)

    def headers(self, extra: dict | None = None) -> dict:
        return {"Authorization": f"Bearer {self.token}", "User-Agent": USER_AGENT, **(extra or {})}

    def check(self, resp: httpx.Response, what: str, allow: tuple[int, ...] = ()) -> httpx.Response:
        """Return 2xx (and allowed) responses; raise _Transient or SyncError for the rest."""
        if resp.is_success or resp.status_code in allow:
            return resp
        try:
            detail = resp.json().get("detail", "")
        except (ValueError, AttributeError, httpx.ResponseNotRead):
            detail = ""
        reason = f"{what}: HQ answered {resp.status_code}{': ' + str(detail) if detail else ''}"
        if resp.status_code in RETRYABLE_STATUS:
            retry_after = _retry_after(resp.headers.get("retry-after")) if resp.status_code in (429, 503) else None
            raise _Transient(reason, retry_after)
        if resp.status_code == 401:
            raise _AuthError(reason + "; the appliance token is not accepted: check hq_token_file")
        if resp.status_code == 403:
            raise _AuthError(reason + "; the token belongs to another appliance: check hq_token_file")
        raise SyncError(reason)

    def call(self, what: str, fn: Callable[[], object]):
        """fn() until it returns; transport errors and _Transient are retried with backoff."""
        last = "not tried"
        for attempt in range(self.policy.max_attempts):
            if self.remaining() <= 0:
                raise SyncError(f"{what}: this pass's time budget of {self.policy.budget_s:.0f} s is spent "
                                f"(last problem: {last}); the next pass continues")
            self.requests += 1
            try:
                return fn()
            except httpx.TransportError as exc:
                last, retry_after = f"{type(exc).__name__}: {exc}".rstrip(": "), None
            except _Transient as exc:
                last, retry_after = str(exc), exc.retry_after
            self.failures += 1
            if attempt + 1 >= self.policy.max_attempts:
                break
            if retry_after is not None:
                delay = min(retry_after, self.policy.max_retry_after_s)
            else:
                delay = self.rng.uniform(0, min(self.policy.cap_s, self.policy.base_s * 2 ** attempt))
            if delay > self.remaining():
                raise SyncError(f"{what}: waiting {delay:.1f} s more would exceed this pass's time budget "
                                f"(last problem: {last}); the next pass continues")
            log.info("%s failed (%s); retry in %.2f s", what, last, delay)
            self.sleep(delay)
            self.slept += delay
        raise SyncError(f"{what} failed {self.policy.max_attempts} times (last: {last}); "
                        "HQ is unreachable or overloaded, the next pass retries")

    def request(self, method: str, path: str, what: str, *, allow: tuple[int, ...] = (),
                headers: dict | None = None, **kwargs) -> httpx.Response:
        def once():
            resp = self.client.request(method, self.base + path, headers=self.headers(headers),
                                       timeout=self.timeout, **kwargs)
            return self.check(resp, what, allow)
        return self.call(what, once)


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


def _upload_frames(s: _Session, store, rows: list[dict], uploaded: set, cache: dict) -> int:
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


def _send_outbox(s: _Session, store, appliance_id: str, result: dict) -> None:
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
        records = [{"idempotency_key": r["idempotency_key"], "kind": r["kind"], "payload": r["payload"]}
                   for r in rows]
        batch_key = _batch_key(rows)

        def post():
            store.record_attempt(ids)
            resp = s.check(s.client.post(s.base + path, json={"records": records}, timeout=s.timeout,
                                         headers=s.headers({"Idempotency-Key": batch_key})),
                           f"sending {len(rows)} outbox rows")
            try:
                body = resp.json()
                return set(body["accepted"]), body.get("rejected") or []
            except (ValueError, KeyError, TypeError):
                raise _Transient("HQ's feedback answer is not the expected JSON") from None

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


# ---------------------------------------------------------------- (b) model

def installed_version(cfg, store) -> int | None:
    """The version of the bundle `current` points at (or the configured start bundle)."""
    bundle = models_install.active_bundle(cfg.bundles_dir, cfg.bundle)
    try:
        version = json.loads((Path(bundle) / lib.MANIFEST).read_bytes())["version"]
        if isinstance(version, int):
            return version
    except (OSError, ValueError, KeyError, TypeError):
        pass
    active = [m["version"] for m in store.model_states() if m["state"] == "active"]
    return max(active) if active else None


def _check_signature(raw: bytes, sig: bytes, key_files: list[Path]) -> None:
    """The manifest signature, before anything big is downloaded (stage() checks all again)."""
    try:
        lib.check_signature(raw, sig, models_install.trusted_keys(key_files))
    except lib.BundleError as exc:
        raise ModelError(f"the bundle HQ offers fails its signature check: {exc}; not installing") from None


def _parse_offer(raw: bytes) -> dict:
    """The offered manifest through the bundle's own manifest check (schema, safe paths)."""
    try:
        return lib.parse_manifest(raw)
    except lib.BundleError as exc:
        raise ModelError(f"the manifest HQ serves is not a valid bundle manifest: {exc}; not installing") from None


def _download(s: _Session, url_path: str, dest: Path, size: int) -> None:
    """Fetch one file to dest, resuming a partial copy with Range; never more than `size` bytes.
    A connection lost after some bytes arrived counts as progress, not as a failed attempt."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    name = url_path.rsplit("/", 1)[-1]

    def too_big():
        return ModelError(f"HQ serves {name} larger than the {size} bytes its manifest says; refusing the bundle")

    def once() -> bool:
        have = dest.stat().st_size if dest.exists() else 0
        if have > size:
            dest.unlink()
            have = 0
        if have == size:
            return True
        start = have
        headers = s.headers({"Range": f"bytes={have}-"} if have else None)
        try:
            with s.client.stream("GET", s.base + url_path, headers=headers, timeout=s.timeout) as resp:
                if not resp.is_success:
                    resp.read()
                s.check(resp, f"downloading {name}")
                if resp.status_code == 206:
                    if not resp.headers.get("content-range", "").startswith(f"bytes {have}-"):
                        raise _Transient(f"HQ answered a range request for {name} with another range")
                else:
                    have = start = 0
                declared = resp.headers.get("content-length")
                if declared and declared.isdigit() and have + int(declared) > size:
                    raise too_big()
                with open(dest, "ab" if have else "wb") as fh:
                    for chunk in resp.iter_bytes():          # as it arrives: a cut keeps what came
                        if have + len(chunk) > size:
                            raise too_big()
                        fh.write(chunk)
                        have += len(chunk)
        except httpx.TransportError:
            if have > start:
                return False            # progress: resume at once
            raise
        if have != size:
            raise _Transient(f"{name} arrived incomplete ({have} of {size} bytes)")
        return True

    while not s.call(f"downloading {name}", once):
        pass


def _prune_bundles(bundles_dir: Path) -> None:
    """Drop staged bundles other than current and previous."""
    keep = {(bundles_dir / name).resolve() for name in ("current", "previous") if (bundles_dir / name).exists()}
    for path in bundles_dir.iterdir():
        if re.fullmatch(r"[0-9a-f]{16}", path.name) and path.is_dir() and not path.is_symlink() \
                and path.resolve() not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _update_model(s: _Session, cfg, store, swap: Swap, model: dict, retry_rejected: bool) -> None:
    """One pass of the model update: is there an offer worth taking, download and verify it,
    then let the running appliance try it (`swap`) and keep or reject it. `model` is filled
    with what happened (action, reason, versions) for the sync report."""
    installed = model["installed"] = installed_version(cfg, store)
    line = quote(cfg.line, safe="")
    offer = _fetch_offer(s, line)
    if offer is None:
        model.update(action="none", reason=f"HQ has no bundle for line {cfg.line}")
        return
    raw, manifest = offer
    offered = model["offered"] = manifest["version"]
    stop = _offer_problem(cfg, store, manifest, installed, retry_rejected)
    if stop is not None:
        model.update(action=stop[0], reason=stop[1])
        return
    files = [(e["path"], e["bytes"]) for e in manifest["files"]]
    total = sum(size for _, size in files)
    if total > MAX_BUNDLE_BYTES:
        raise ModelError(f"bundle v{offered} is {total} bytes, over the {MAX_BUNDLE_BYTES}-byte limit; "
                         "not downloading it")
    try:
        work = _download_verified(s, cfg, raw, files, offered, f"/v1/lines/{line}/bundles/{offered}/")
        model["downloaded_bytes"] = total
        try:
            staged, verified = models_install.stage(work, cfg.bundles_dir, cfg.key_files(), cfg.line, installed)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except ModelError as exc:
        store.record_model(offered, "rejected", f"verify: {exc}")
        model.update(action="rejected", reason=str(exc))
        return
    _try_and_keep(cfg, store, swap, model, staged, verified, offered)


def _fetch_offer(s: _Session, line: str) -> tuple[bytes, dict] | None:
    """HQ's latest manifest for this line (raw bytes and parsed), or None when it has none."""
    resp = s.request("GET", f"/v1/lines/{line}/manifest", "fetching the latest manifest", allow=(404,))
    if resp.status_code == 404:
        return None
    raw = resp.content
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ModelError(f"the manifest HQ serves is {len(raw)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    return raw, _parse_offer(raw)


def _offer_problem(cfg, store, manifest: dict, installed: int | None, retry_rejected: bool) -> tuple[str, str] | None:
    """(action, reason) when the offered bundle is not to be downloaded, else None."""
    offered = manifest["version"]
    if manifest.get("line") != cfg.line:
        return "refused", f"HQ offers a bundle for line {manifest.get('line')!r}, this appliance runs {cfg.line!r}"
    if installed is not None and offered < installed:
        return "refused", f"HQ offers version {offered}, below the installed {installed}: downgrades are not installed"
    if installed is not None and offered == installed:
        return "up-to-date", ""
    rejected = [m for m in store.model_states() if m["version"] == offered and m["state"] == "rejected"
                and (m["reason"] or "").startswith("swap: ")]      # verification failures are retried
    if rejected and not retry_rejected:
        return "skipped", f"version {offered} was rejected before: {rejected[0]['reason']}"
    return None


def _download_verified(s: _Session, cfg, raw: bytes, files: list[tuple[str, int]], offered: int,
                       base: str) -> Path:
    """Check the manifest's signature, then download every listed file (resuming a partial
    download of the same manifest) into state_dir/downloads; ModelError on any failure."""
    sig = s.request("GET", base + lib.SIGNATURE, "fetching manifest.sig").content[:MAX_SIGNATURE_BYTES]
    _check_signature(raw, sig, cfg.key_files())
    downloads = Path(cfg.state_dir) / "downloads"
    work = downloads / f"{cfg.line}-v{offered}"
    for old in (downloads.iterdir() if downloads.is_dir() else ()):
        if old != work:
            shutil.rmtree(old, ignore_errors=True)
    if (work / lib.MANIFEST).exists() and (work / lib.MANIFEST).read_bytes() != raw:
        shutil.rmtree(work)                 # partial download of other content: start over
    work.mkdir(parents=True, exist_ok=True)
    (work / lib.MANIFEST).write_bytes(raw)
    (work / lib.SIGNATURE).write_bytes(sig)
    try:
        for path, size in files:
            _download(s, base + quote(path), work / path, size)
    except ModelError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return work


def _try_and_keep(cfg, store, swap: Swap, model: dict, staged: Path, verified: dict, offered: int) -> None:
    """The running appliance tries the staged bundle; kept (switched to, older ones pruned),
    rejected, or deferred to the next pass when the trial was inconclusive."""
    try:
        outcome = swap(staged, verified)
        ok, reason = (outcome if isinstance(outcome, tuple) else (bool(outcome), ""))
    except TrialInconclusive as exc:   # neither kept nor rejected: offered again next pass
        shutil.rmtree(staged, ignore_errors=True)
        log.warning("v%s not kept yet: %s", offered, exc)
        model.update(action="deferred", reason=str(exc))
        return
    except Exception as exc:  # the running appliance's check failed: keep the old model
        log.exception("swap to v%s failed", offered)
        ok, reason = False, f"swap raised {type(exc).__name__}: {exc}"
    if not ok:
        shutil.rmtree(staged, ignore_errors=True)
        store.record_model(offered, "rejected", f"swap: {reason or 'golden-set check failed'}")
        model.update(action="rejected", reason=reason or "golden-set check failed")
        return
    models_install.switch(cfg.bundles_dir, staged)
    store.record_model(offered, "active", "installed from HQ")
    _prune_bundles(Path(cfg.bundles_dir))
    model.update(action="installed", reason="", bundle=str(staged))


def golden_check_swap(cfg) -> Swap:
    """The swap used when no running appliance supplies one (the `linejudge sync` timer): load
    the staged bundle in this process and run its golden-set check. The appliance service
    picks up `current` on its next start."""
    def swap(staged: Path, manifest: dict) -> tuple[bool, str]:
        from appliance.runtime import open_checked_runtime
        try:
            open_checked_runtime(staged, manifest, cfg)
        except ModelError as exc:
            return False, str(exc)
        return True, ""
    return swap


# ---------------------------------------------------------------- (c) status

def _report_status(s: _Session, cfg, store, appliance_id: str, result: dict, report=None) -> None:
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
    except _AuthError as exc:
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
            s = _Session(client or own_client, cfg.hq_url, token, policy=policy, sleep=sleep, clock=clock,
                         rng=rng or random.Random(), timeout=timeout)
            ident = {"id": token.rsplit(".", 1)[0] if "." in token else None}

            def whoami():
                if ident["id"] is None:
                    ident["id"] = s.request("GET", "/v1/whoami", "asking HQ who this appliance is").json()["appliance_id"]

            go = _run_phase("identify", whoami, result)
            go = go and _run_phase("outbox", lambda: _send_outbox(s, store, ident["id"], result), result)
            if go and update_model:
                go = _run_phase("model", lambda: _update_model(s, cfg, store, swap or golden_check_swap(cfg),
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
