"""Publishing signed bundles at HQ, and which version of each line is the latest.

A published bundle is a copy under <state>/bundles/<line>/<version>/ of manifest.json,
manifest.sig and the files the manifest lists; versions per line only increase and a published
version is never replaced. The checks are the bundle's own (models/bundle.py); the server hands
the files out as they are (training/hq/server.py).
"""
from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

from models.common import is_whole, to_iso
from models import bundle as lib
from training.hq.state import NAME_RE, HQError, HQState, init_state, sha256_hex


def bundle_dir_of(hq: HQState, line: str, version: int) -> Path:
    """Where version `version` of `line` is (or would be) published."""
    return hq.dir / "bundles" / line / str(version)


def latest_bundle(state: HQState | Path, line: str) -> int | None:
    with init_state(state).db.connect() as db:
        row = db.one("SELECT max(version) FROM bundles WHERE line = ?", [line])
    return row[0] if row and row[0] is not None else None


def latest_bundles(state: HQState | Path) -> dict[str, int]:
    """The latest published version of every line."""
    with init_state(state).db.connect() as db:
        return {r["line"]: r["version"] for r in
                db.query("SELECT line, max(version) AS version FROM bundles GROUP BY line")}


def publish_bundle(state: HQState | Path, bundle_dir: Path, key_files: list[Path] | None = None) -> Path:
    """Copy a signed bundle to state_dir/bundles/<line>/<version>/ and make it the line's latest.

    Only manifest.json, manifest.sig and the files the manifest lists are copied. Versions per
    line must increase; a published version is never replaced. With key_files the full
    signature verification runs first.
    """
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise HQError(f"{bundle_dir} is not a bundle directory; pass the directory 'linejudge export' wrote")
    hq = init_state(state)
    raw, manifest = _checked_manifest(bundle_dir, key_files)
    line, version = manifest["line"], manifest["version"]
    latest = latest_bundle(hq, line)
    if latest is not None and version <= latest:
        raise HQError(f"line {line} already has version {latest}; bundle versions must increase, "
                      f"export this one as version {latest + 1} or higher")
    dest = _copy_bundle(bundle_dir, manifest, bundle_dir_of(hq, line, version))
    with hq.db.connect() as db, db.write():
        db.execute("INSERT INTO bundles (line, version, manifest_sha256, published_at) VALUES (?, ?, ?, ?)",
                   [line, version, sha256_hex(raw), to_iso()])
    return dest


def _checked_manifest(bundle_dir: Path, key_files: list[Path] | None) -> tuple[bytes, dict]:
    """The bundle's manifest (raw bytes and parsed) once the bundle's own checks pass (the
    signature too when HQ holds the trust list) and its line and version can be published."""
    for name in lib.RESERVED:
        if not (bundle_dir / name).is_file():
            raise HQError(f"{bundle_dir} has no {name}: sign the bundle before publishing "
                          "('linejudge bundle sign')")
    raw = (bundle_dir / lib.MANIFEST).read_bytes()
    try:
        manifest = lib.parse_manifest(raw)
        lib.check_files(bundle_dir, manifest["files"], allow_unlisted=True)
        if key_files:
            lib.verify_bundle(bundle_dir, lib.load_public_keys(key_files), line=manifest["line"])
    except lib.BundleError as exc:
        raise HQError(f"not publishing {bundle_dir}: {exc}") from None
    line, version = manifest.get("line"), manifest.get("version")
    if not isinstance(line, str) or not NAME_RE.match(line):
        raise HQError(f"manifest line {line!r} is not a valid line name")
    if not is_whole(version) or version < 0:
        raise HQError(f"manifest version {version!r} is not a non-negative integer")
    return raw, manifest


def _copy_bundle(bundle_dir: Path, manifest: dict, dest: Path) -> Path:
    """Copy the manifest, its signature and the listed files into dest, whole or not at all:
    into a hidden directory beside it, fsynced, then renamed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        raise HQError(f"{dest} exists already; published bundles are never replaced")
    tmp = dest.parent / f".publish-{dest.name}-{secrets.token_hex(4)}"
    try:
        for rel in [*lib.RESERVED, *(e["path"] for e in manifest["files"])]:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle_dir / rel, tmp / rel)
            with open(tmp / rel, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
