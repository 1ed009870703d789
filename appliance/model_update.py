"""The model part of a sync pass: GET the line's latest manifest; if its version is above the
installed one, check the manifest signature, download the files (resumable with HTTP Range,
each capped at its manifest size, all together at MAX_BUNDLE_BYTES) into state/downloads/,
stage them (models_install.stage verifies signature, hashes, line and version), then call
swap(staged_dir, manifest) -> (ok, reason): ok switches `current`, not ok records the version
rejected. A swap that raises TrialInconclusive is tried again on the next pass."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Callable
from urllib.parse import quote

import httpx

from appliance import models_install
from appliance.hq_session import HQSession, Transient
from models import bundle as lib
from models.errors import ModelError, TrialInconclusive

log = logging.getLogger("linejudge.sync")

MAX_BUNDLE_BYTES = 500 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024
MAX_SIGNATURE_BYTES = 64 * 1024

Swap = Callable[[Path, dict], "tuple[bool, str]"]


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


def _download(s: HQSession, url_path: str, dest: Path, size: int) -> None:
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
                        raise Transient(f"HQ answered a range request for {name} with another range")
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
            raise Transient(f"{name} arrived incomplete ({have} of {size} bytes)")
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


def update_model(s: HQSession, cfg, store, swap: Swap, model: dict, retry_rejected: bool) -> None:
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


def _fetch_offer(s: HQSession, line: str) -> tuple[bytes, dict] | None:
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


def _download_verified(s: HQSession, cfg, raw: bytes, files: list[tuple[str, int]], offered: int,
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
