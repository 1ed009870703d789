"""Signed model bundles: manifest building, ed25519 signing and strict verification.

A bundle is a directory holding the model files, ``manifest.json`` (what the files are,
their sizes and SHA-256, and everything needed to run them) and ``manifest.sig`` (an
ed25519 signature over the exact manifest bytes, with the id of the signing key).

``verify_bundle`` accepts a bundle only if every check passes and otherwise raises the
specific :class:`BundleError` subclass for the first failed check. This module stays free
of appliance, torch and numpy imports so both HQ tooling and the appliance can use it.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from models.errors import ModelError
from models.common import is_whole, parse_iso, to_iso, utc, write_file_atomic

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
RESERVED = (MANIFEST, SIGNATURE)
_CHUNK = 1 << 20
_DICT_FIELDS = ("compatible", "preprocessing", "thresholds", "ood", "lineage", "metrics")


class BundleError(ModelError):
    """A bundle cannot be trusted or used; the message says what is wrong and what to do."""


class MissingSignature(BundleError):
    """manifest.json or manifest.sig is absent: the bundle is unsigned."""


class BadSignature(BundleError):
    """The signature is unreadable or does not match the manifest bytes."""


class UnknownKey(BundleError):
    """The bundle is signed with a key this appliance does not trust."""


class FileHashMismatch(BundleError):
    """A listed file's SHA-256 differs from the manifest."""


class FileSizeMismatch(BundleError):
    """A listed file's size differs from the manifest."""


class ExtraFile(BundleError):
    """The bundle holds a file the manifest does not list."""


class MissingFile(BundleError):
    """A file the manifest lists is not in the bundle."""


class UnsafePath(BundleError):
    """An absolute or '..' path, a link, or a non-regular file."""


class ExpiredManifest(BundleError):
    """The manifest's expiry time has passed."""


class VersionNotNewer(BundleError):
    """The bundle version is not above the installed one."""


class WrongLine(BundleError):
    """The bundle was exported for another production line."""


class IncompatibleBundle(BundleError):
    """The bundle's input spec differs from the appliance's."""


class MalformedManifest(BundleError):
    """manifest.json is not valid JSON or misses/mistypes required fields."""


# ---------------------------------------------------------------- keys

def is_bundle(path) -> bool:
    """A directory with a manifest: a bundle (as opposed to a training run)."""
    return (Path(path) / MANIFEST).is_file()


def generate_keypair(out_dir: Path, key_id: str) -> tuple[Path, Path]:
    """Write ``<key_id>.key`` (PEM PKCS#8, mode 0600) and ``<key_id>.pub`` (PEM) to out_dir."""
    if not key_id or "/" in key_id or "\\" in key_id or key_id.startswith("."):
        raise BundleError(f"invalid key id {key_id!r}: use a plain name such as 'hq-2025'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out_dir / f"{key_id}.key", out_dir / f"{key_id}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise BundleError(f"{path} already exists: refusing to overwrite a key; "
                              "pick another key id or move the old key away")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    os.chmod(private_path, 0o600)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(path) -> Ed25519PrivateKey:
    """Load an unencrypted PEM ed25519 private key."""
    if not path:
        raise BundleError("no private key given: pass --key with the .key file written by "
                          "'linejudge bundle keygen'")
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise BundleError(f"cannot load private key {path}: {exc}; "
                          "pass the .key file written by 'linejudge bundle keygen'") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"private key {path} is not an ed25519 key")
    return key


def load_public_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Load trusted public keys (PEM or 64 hex chars); the key id is the file stem."""
    keys: dict[str, Ed25519PublicKey] = {}
    for path in map(Path, paths):
        if path.stem in keys:
            raise BundleError(f"two trusted keys share the id {path.stem!r} ({path}); rename one")
        keys[path.stem] = _load_public_key(path)
    return keys


def _load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        data = path.read_bytes()
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(data.decode("ascii").strip()))
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot load public key {path}: {exc}; expected a PEM ed25519 "
                          "public key or 64 hex characters") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"public key {path} is not an ed25519 key")
    return key


# ---------------------------------------------------------------- building and signing

def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(bundle_dir: Path, *, line: str, version: int, expires_days: float | None,
                   compatible: dict, preprocessing: dict, thresholds: dict, ood: dict,
                   lineage: dict, metrics: dict, extra: dict | None = None,
                   now: datetime | None = None) -> dict:
    """Describe every regular file in bundle_dir plus the given metadata (not yet written)."""
    bundle_dir = Path(bundle_dir)
    created = utc(now).replace(microsecond=0)
    files = [{"path": rel, "bytes": (bundle_dir / rel).stat().st_size,
              "sha256": file_sha256(bundle_dir / rel)} for rel in _scan(bundle_dir)]
    manifest = {
        "schema_version": SCHEMA_VERSION, "line": line, "version": version,
        "created": _iso(created),
        "expires": None if expires_days is None else _iso(created + timedelta(days=expires_days)),
        "compatible": compatible, "preprocessing": preprocessing, "thresholds": thresholds,
        "ood": ood, "lineage": lineage, "metrics": metrics, "files": files,
    }
    clash = sorted(set(extra or {}) & set(manifest))
    if clash:
        raise MalformedManifest(f"extra manifest fields {clash} clash with standard fields; rename them")
    manifest.update(extra or {})
    _check_schema(manifest)
    for entry in manifest["files"]:
        _check_listed_path(entry["path"])
    return manifest


def canonical_json(manifest: dict) -> bytes:
    return (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_manifest(bundle_dir, manifest: dict) -> Path:
    """Write manifest.json canonically (sorted keys, indent 2, UTF-8, trailing newline)."""
    path = Path(bundle_dir) / MANIFEST
    write_file_atomic(path, canonical_json(manifest))
    return path


def sign_bundle(bundle_dir, private_key_path, key_id: str | None = None) -> Path:
    """Sign the exact manifest.json bytes; write manifest.sig {"key_id", "signature"}."""
    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / MANIFEST
    if not manifest_path.is_file():
        raise MissingFile(f"{manifest_path} not found: write the manifest before signing")
    key = load_private_key(private_key_path)
    key_id = key_id or Path(private_key_path).stem
    signature = key.sign(manifest_path.read_bytes())
    body = {"key_id": key_id, "signature": base64.b64encode(signature).decode("ascii")}
    path = bundle_dir / SIGNATURE
    write_file_atomic(path, (json.dumps(body, sort_keys=True, indent=2) + "\n").encode("utf-8"))
    return path


# ---------------------------------------------------------------- verification

def verify_bundle(bundle_dir, trusted_keys: dict[str, Ed25519PublicKey], *,
                  installed_version: int | None = None, line: str | None = None,
                  input_spec: dict | None = None, now: datetime | None = None,
                  allow_expired: bool = False) -> dict:
    """Return the parsed manifest if the bundle passes every check, else raise a BundleError.
    allow_expired: the one bundle an appliance already runs keeps running past its expiry (with
    an alarm, see expired()); a bundle about to be installed never may."""
    bundle_dir = Path(bundle_dir)
    if not bundle_dir.is_dir():
        raise MissingFile(f"bundle directory {bundle_dir} not found")
    raw = _verify_signature(bundle_dir, trusted_keys)
    manifest = parse_manifest(raw)
    check_files(bundle_dir, manifest["files"])
    _check_policy(manifest, installed_version, line, input_spec, None if allow_expired else utc(now))
    return manifest


def expired(manifest: dict, now: datetime | None = None) -> bool:
    """Whether a (verified) manifest's expiry time has passed."""
    return manifest.get("expires") is not None and utc(now) >= parse_iso(manifest["expires"])


def _verify_signature(bundle_dir: Path, trusted_keys: dict) -> bytes:
    manifest_path, sig_path = bundle_dir / MANIFEST, bundle_dir / SIGNATURE
    for path in (manifest_path, sig_path):
        if path.is_symlink() or not path.is_file():
            raise MissingSignature(f"{path} is missing (or not a regular file): the bundle is "
                                   "unsigned; sign it at HQ with 'linejudge bundle sign'")
    raw = manifest_path.read_bytes()
    check_signature(raw, sig_path.read_bytes(), trusted_keys)
    return raw


def check_signature(raw_manifest: bytes, raw_signature: bytes, trusted_keys: dict) -> str:
    """The one signature check (verify_bundle, the appliance's sync before it downloads, HQ):
    raw_signature is manifest.sig's bytes; returns the key id, or raises a BundleError."""
    key_id, signature = _parse_signature(raw_signature)
    if key_id not in trusted_keys:
        raise UnknownKey(f"{SIGNATURE} is signed with key {key_id!r}, which is not trusted here "
                         f"(trusted: {sorted(trusted_keys) or 'none'}); install its public key "
                         "or re-sign with a trusted key")
    try:
        trusted_keys[key_id].verify(signature, raw_manifest)
    except InvalidSignature:
        raise BadSignature(f"{SIGNATURE} does not match {MANIFEST} (key {key_id!r}): the manifest "
                           "was changed after signing or is corrupt; do not install, re-export") from None
    return key_id


def _parse_signature(raw_signature: bytes) -> tuple[str, bytes]:
    try:
        body = json.loads(raw_signature.decode("utf-8"))
        key_id, encoded = body["key_id"], body["signature"]
        if not isinstance(key_id, str) or not isinstance(encoded, str):
            raise TypeError("key_id and signature must be strings")
        signature = base64.b64decode(encoded, validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise BadSignature(f"{SIGNATURE} is unreadable ({exc}); expected JSON "
                           '{"key_id": ..., "signature": <base64>}; re-sign the bundle') from None
    if len(signature) != 64:
        raise BadSignature(f"{SIGNATURE} holds a {len(signature)}-byte signature, not 64 (ed25519)")
    return key_id, signature


def parse_manifest(raw: bytes) -> dict:
    """The one manifest check (verify_bundle, sync before it downloads, HQ before it publishes):
    UTF-8 JSON, the schema, and every listed path safe; raises a BundleError."""
    try:
        manifest = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedManifest(f"{MANIFEST} is not valid UTF-8 JSON: {exc}") from None
    _check_schema(manifest)
    for entry in manifest["files"]:
        _check_listed_path(entry["path"])
    return manifest


def _no_duplicate_keys(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def _check_schema(m) -> None:
    def bad(why: str):
        raise MalformedManifest(f"{MANIFEST}: {why}; re-export the bundle with matching tooling")

    if not isinstance(m, dict):
        bad("top level is not a JSON object")
    if m.get("schema_version") != SCHEMA_VERSION:
        bad(f"schema_version {m.get('schema_version')!r} is not supported (expected {SCHEMA_VERSION})")
    if not isinstance(m.get("line"), str) or not m["line"]:
        bad("'line' must be a non-empty string")
    if not is_whole(m.get("version")) or m["version"] < 0:
        bad("'version' must be a non-negative integer")
    for field in ("created", "expires"):
        value = m.get(field)
        if (field == "created" or value is not None) and parse_iso(value) is None:
            bad(f"'{field}' must be an ISO-8601 timestamp with a time zone, got {value!r}")
    for field in _DICT_FIELDS:
        if not isinstance(m.get(field), dict):
            bad(f"'{field}' must be an object")
    if not isinstance(m.get("files"), list):
        bad("'files' must be a list")
    seen: set[str] = set()
    for entry in m["files"]:
        why = _file_entry_problem(entry, seen)
        if why:
            bad(why)


def _file_entry_problem(entry, seen: set) -> str | None:
    if not isinstance(entry, dict) or set(entry) != {"path", "bytes", "sha256"}:
        return f"file entry {entry!r} must have exactly path, bytes and sha256"
    path, size, digest = entry["path"], entry["bytes"], entry["sha256"]
    if not isinstance(path, str) or not path:
        return f"file entry path {path!r} must be a non-empty string"
    if not is_whole(size) or size < 0:
        return f"file {path!r}: bytes must be a non-negative integer"
    if not isinstance(digest, str) or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
        return f"file {path!r}: sha256 must be 64 lowercase hex characters"
    if path in seen:
        return f"file {path!r} is listed twice"
    seen.add(path)
    return None


def check_files(bundle_dir: Path, entries: list[dict], *, allow_unlisted: bool = False) -> None:
    """Every listed file present, a regular file, with its size and sha256; no links anywhere;
    no unlisted file unless allow_unlisted (HQ publishes only what the manifest lists)."""
    present = _scan(bundle_dir)  # raises UnsafePath on links and special files
    listed = {entry["path"] for entry in entries}
    for entry in entries:
        if entry["path"] not in present:
            raise MissingFile(f"{entry['path']} is listed in {MANIFEST} but missing from the "
                              "bundle; the copy is incomplete, transfer the bundle again")
    for entry in entries:
        size = (bundle_dir / entry["path"]).stat().st_size
        if size != entry["bytes"]:
            raise FileSizeMismatch(f"{entry['path']} is {size} bytes, manifest says {entry['bytes']}; "
                                   "the file is truncated or altered, transfer the bundle again")
    for entry in entries:
        digest = file_sha256(bundle_dir / entry["path"])
        if digest != entry["sha256"]:
            raise FileHashMismatch(f"{entry['path']} has sha256 {digest}, manifest says "
                                   f"{entry['sha256']}; the file was altered, do not install")
    extra = sorted(set(present) - listed)
    if extra and not allow_unlisted:
        raise ExtraFile(f"{extra[0]} is in the bundle but not in {MANIFEST} "
                        f"({len(extra)} unlisted file(s)); remove it or re-export the bundle")


def path_problem(path) -> str | None:
    """Why a bundle file path is unsafe (absolute, '..', not normalized, reserved), or None."""
    try:
        _check_listed_path(path)
    except UnsafePath as exc:
        return str(exc)
    return None


def _check_listed_path(path: str) -> None:
    if not isinstance(path, str) or not path:
        raise UnsafePath(f"{path!r} in {MANIFEST} is not a file path")
    posix = PurePosixPath(path)
    if posix.is_absolute() or path.startswith("\\") or (len(path) > 1 and path[1] == ":"):
        raise UnsafePath(f"{path!r} in {MANIFEST} is an absolute path; bundle paths must be "
                         "relative to the bundle directory")
    parts = path.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafePath(f"{path!r} in {MANIFEST} contains '..'; bundle paths may not leave "
                         "the bundle directory")
    if any(part in ("", ".") for part in parts) or "\\" in path or "\x00" in path:
        raise UnsafePath(f"{path!r} in {MANIFEST} is not a normalized relative posix path")
    if path in RESERVED:
        raise UnsafePath(f"{path!r} in {MANIFEST} names a reserved bundle file")


def _scan(bundle_dir: Path) -> list[str]:
    """Sorted posix paths of all regular files except manifest/signature; no links allowed."""
    found: list[str] = []
    for root, dirs, files in os.walk(bundle_dir, followlinks=False):
        for name in sorted(dirs + files):
            path = Path(root, name)
            rel = path.relative_to(bundle_dir).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise UnsafePath(f"{rel} is a symbolic link; bundles may not contain links, "
                                 "replace it with the real file and re-export")
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise UnsafePath(f"{rel} is not a regular file; remove it from the bundle")
            if st.st_nlink > 1:
                raise UnsafePath(f"{rel} is a hard link ({st.st_nlink} names); bundles may not "
                                 "contain links, copy the file instead")
            if rel not in RESERVED:
                found.append(rel)
    return sorted(found)


def _check_policy(m: dict, installed_version, line, input_spec, now: datetime | None) -> None:
    """now: the moment the expiry is checked against; None skips the expiry check."""
    if now is not None and expired(m, now):
        raise ExpiredManifest(f"{MANIFEST} expired at {m['expires']} (now {_iso(now)}); "
                              "ask HQ for a fresh bundle or check the appliance clock")
    if installed_version is not None and m["version"] <= installed_version:
        raise VersionNotNewer(f"bundle version {m['version']} is not newer than the installed "
                              f"version {installed_version}; versions must increase")
    if line is not None and m["line"] != line:
        raise WrongLine(f"bundle is for line {m['line']!r}, this appliance runs line {line!r}; "
                        "install the bundle exported for this line")
    if input_spec is not None:
        _check_input_spec(m, input_spec)


def _check_input_spec(m: dict, input_spec: dict) -> None:
    expected = json.loads(json.dumps(input_spec))  # tuples -> lists, like the manifest
    actual = m["compatible"].get("input")
    if actual != expected:
        if isinstance(actual, dict):
            keys = sorted(k for k in set(actual) | set(expected) if actual.get(k) != expected.get(k))
            detail = f"differs in {keys}"
        else:
            detail = "has no 'compatible.input' object"
        raise IncompatibleBundle(f"bundle input spec {detail} (bundle {actual!r}, appliance "
                                 f"{expected!r}); export a bundle for this appliance's input spec")


# ---------------------------------------------------------------- small helpers


def iso_now() -> str:
    return _iso(utc())


def _iso(moment: datetime) -> str:
    """Bundle manifests write whole seconds with a Z."""
    return to_iso(moment, timespec="seconds").replace("+00:00", "Z")
