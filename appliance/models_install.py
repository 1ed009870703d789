"""Which bundle the appliance runs: verify, stage, switch atomically, keep the previous one.

    <state>/bundles/<manifest-sha256[:16]>/   verified copies (staging named by manifest hash)
    <state>/bundles/current  -> symlink to the active one
    <state>/bundles/previous -> symlink to the one before (kept by pruning)

The bundle shipped in models/bundles/ is verified like any other; nothing unsigned runs.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from models.errors import ModelError
from models import bundle as lib


def trusted_keys(key_files: list[Path]) -> dict:
    if not key_files:
        raise ModelError("no trusted public keys configured; set trusted_keys in the appliance config "
                         "or place the HQ public key in models/keys/")
    return lib.load_public_keys(key_files)


def verify(bundle_dir: Path, key_files: list[Path], line: str | None = None,
           installed_version: int | None = None, allow_expired: bool = False) -> dict:
    """allow_expired: for the bundle this appliance already runs (at start), never for one it installs."""
    try:
        return lib.verify_bundle(bundle_dir, trusted_keys(key_files), line=line,
                                 installed_version=installed_version, allow_expired=allow_expired)
    except lib.BundleError as exc:
        raise ModelError(f"bundle {bundle_dir} rejected: {exc}") from None


def active_bundle(bundles_dir: Path, fallback: Path) -> Path:
    current = Path(bundles_dir) / "current"
    return current.resolve() if current.exists() else Path(fallback)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage(bundle_dir: Path, bundles_dir: Path, key_files: list[Path], line: str,
          installed_version: int | None) -> tuple[Path, dict]:
    """Copy a candidate bundle into staging, verify the copy (not the source), fsync it."""
    bundles_dir = Path(bundles_dir)
    bundles_dir.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256((Path(bundle_dir) / lib.MANIFEST).read_bytes()).hexdigest()[:16]
    target = bundles_dir / digest
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(bundle_dir, target, symlinks=True)
    try:
        manifest = verify(target, key_files, line=line, installed_version=installed_version)
    except ModelError:
        shutil.rmtree(target, ignore_errors=True)
        raise
    _fsync_tree(target)
    return target, manifest


def switch(bundles_dir: Path, target: Path) -> None:
    """Atomically point `current` at target; the old current becomes `previous`."""
    bundles_dir = Path(bundles_dir)
    current, previous = bundles_dir / "current", bundles_dir / "previous"
    if current.exists():
        _atomic_link(previous, current.resolve())
    _atomic_link(current, Path(target).resolve())


def _atomic_link(link: Path, target: Path) -> None:
    tmp = link.with_name(link.name + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target)
    os.replace(tmp, link)
    fd = os.open(link.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
