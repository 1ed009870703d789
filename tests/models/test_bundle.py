"""Signed bundle: build, sign, verify, and one rejection per tampering case."""
import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from models import bundle as b

NOW = datetime(2025, 3, 1, 12, 0, tzinfo=timezone.utc)
INPUT = {"image": [1, 1, 224, 224], "dtype": "float32", "max_tokens": 32}


@pytest.fixture
def keys(tmp_path):
    private, public = b.generate_keypair(tmp_path / "keys", "hq")
    return private, b.load_public_keys([public])


def make_bundle(root: Path, private: Path, **overrides) -> Path:
    bundle = root / "el-solar-v3"
    (bundle / "golden").mkdir(parents=True, exist_ok=True)
    (bundle / "scorer.onnx").write_bytes(b"onnx-graph-bytes" * 10)
    (bundle / "catalog.yaml").write_text("defects:\n  - crack\n")
    (bundle / "golden" / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(64)))
    args = dict(line="el-solar", version=3, expires_days=30, compatible={"input": INPUT, "opset": 17},
                preprocessing={"image_size": 224}, thresholds={"flag": 0.5}, ood={"mean": 0.1},
                lineage={"parent": 2}, metrics={"acc": 0.9}, extra={"graphs": {"scorer": "scorer.onnx"}},
                now=NOW)
    args.update(overrides)
    b.write_manifest(bundle, b.build_manifest(bundle, **args))
    b.sign_bundle(bundle, private)
    return bundle


@pytest.fixture
def signed(tmp_path, keys):
    return make_bundle(tmp_path, keys[0])


def verify(bundle, keys, **kw):
    kw.setdefault("now", NOW + timedelta(days=1))
    return b.verify_bundle(bundle, keys[1], **kw)


def edit_manifest(bundle: Path, private: Path, change) -> None:
    manifest = json.loads((bundle / b.MANIFEST).read_text())
    change(manifest)
    b.write_manifest(bundle, manifest)
    b.sign_bundle(bundle, private)


def rejects(exc_class, *words, bundle, keys, **kw):
    with pytest.raises(exc_class) as info:
        verify(bundle, keys, **kw)
    assert isinstance(info.value, b.BundleError)
    for word in words:
        assert word in str(info.value), str(info.value)
    return info.value


# ---------------------------------------------------------------- happy path

def test_keygen_writes_private_key_0600_and_loadable_public_key(tmp_path, keys):
    private, trusted = keys
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert list(trusted) == ["hq"]
    assert b.load_private_key(private).public_key().public_bytes_raw() == trusted["hq"].public_bytes_raw()


def test_public_key_as_raw_hex(tmp_path, keys):
    raw = keys[1]["hq"].public_bytes_raw().hex()
    (tmp_path / "site.pub").write_text(raw + "\n")
    assert b.load_public_keys([tmp_path / "site.pub"])["site"].public_bytes_raw().hex() == raw


def test_manifest_lists_files_sorted_with_hashes(signed):
    manifest = json.loads((signed / b.MANIFEST).read_text())
    assert [f["path"] for f in manifest["files"]] == ["catalog.yaml", "golden/x.png", "scorer.onnx"]
    png = signed / "golden" / "x.png"
    assert manifest["files"][1] == {"path": "golden/x.png", "bytes": png.stat().st_size,
                                    "sha256": b.file_sha256(png)}
    assert manifest["schema_version"] == b.SCHEMA_VERSION
    assert manifest["created"] == "2025-03-01T12:00:00Z"
    assert manifest["expires"] == "2025-03-31T12:00:00Z"
    assert manifest["graphs"] == {"scorer": "scorer.onnx"}
    raw = (signed / b.MANIFEST).read_bytes()
    assert raw == (json.dumps(manifest, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode()
    sig = json.loads((signed / b.SIGNATURE).read_text())
    assert sig["key_id"] == "hq" and len(sig["signature"]) == 88


def test_verify_ok(signed, keys):
    manifest = verify(signed, keys, installed_version=2, line="el-solar",
                      input_spec={**INPUT, "image": (1, 1, 224, 224)})
    assert manifest["version"] == 3 and manifest["line"] == "el-solar"
    assert len(manifest["files"]) == 3


def test_no_expiry(tmp_path, keys):
    bundle = make_bundle(tmp_path, keys[0], expires_days=None)
    assert verify(bundle, keys, now=NOW + timedelta(days=3650))["expires"] is None


# ---------------------------------------------------------------- signature and keys

def test_missing_signature(signed, keys):
    (signed / b.SIGNATURE).unlink()
    rejects(b.MissingSignature, b.SIGNATURE, "unsigned", bundle=signed, keys=keys)


def test_missing_manifest(signed, keys):
    (signed / b.MANIFEST).unlink()
    rejects(b.MissingSignature, b.MANIFEST, bundle=signed, keys=keys)


def test_bad_signature_when_manifest_edited_after_signing(signed, keys):
    manifest = json.loads((signed / b.MANIFEST).read_text())
    manifest["thresholds"]["flag"] = 0.99
    b.write_manifest(signed, manifest)
    rejects(b.BadSignature, b.MANIFEST, "changed after signing", bundle=signed, keys=keys)


def test_unreadable_signature_file(signed, keys):
    (signed / b.SIGNATURE).write_text("not json")
    rejects(b.BadSignature, b.SIGNATURE, "unreadable", bundle=signed, keys=keys)


def test_unknown_key(tmp_path, signed, keys):
    other_private, _ = b.generate_keypair(tmp_path / "other", "rogue")
    b.sign_bundle(signed, other_private)
    rejects(b.UnknownKey, "rogue", "not trusted", bundle=signed, keys=keys)


def test_trusted_id_with_other_key_is_bad_signature(tmp_path, signed, keys):
    other_private, _ = b.generate_keypair(tmp_path / "other", "rogue")
    b.sign_bundle(signed, other_private, key_id="hq")
    rejects(b.BadSignature, "hq", bundle=signed, keys=keys)


def test_malformed_manifest_signed(signed, keys):
    edit_manifest(signed, keys[0], lambda m: m.pop("files"))
    rejects(b.MalformedManifest, "files", bundle=signed, keys=keys)


# ---------------------------------------------------------------- files

def test_file_content_changed_same_size(signed, keys):
    path = signed / "scorer.onnx"
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    rejects(b.FileHashMismatch, "scorer.onnx", "sha256", bundle=signed, keys=keys)


def test_file_truncated(signed, keys):
    path = signed / "golden" / "x.png"
    path.write_bytes(path.read_bytes()[:10])
    rejects(b.FileSizeMismatch, "golden/x.png", "10 bytes", bundle=signed, keys=keys)


def test_extra_file(signed, keys):
    (signed / "golden" / "sneaky.py").write_text("import os\n")
    rejects(b.ExtraFile, "golden/sneaky.py", "not in manifest.json", bundle=signed, keys=keys)


def test_missing_file(signed, keys):
    (signed / "catalog.yaml").unlink()
    rejects(b.MissingFile, "catalog.yaml", "missing", bundle=signed, keys=keys)


def _add_entry(path):
    return lambda m: m["files"].append({"path": path, "bytes": 4, "sha256": "0" * 64})


def test_absolute_path_in_manifest(signed, keys):
    edit_manifest(signed, keys[0], _add_entry("/etc/passwd"))
    rejects(b.UnsafePath, "/etc/passwd", "absolute", bundle=signed, keys=keys)


def test_dotdot_path_in_manifest(signed, keys):
    edit_manifest(signed, keys[0], _add_entry("golden/../../outside.bin"))
    rejects(b.UnsafePath, "golden/../../outside.bin", "'..'", bundle=signed, keys=keys)


def test_symlink_in_bundle(signed, keys):
    os.symlink(signed / "scorer.onnx", signed / "golden" / "link.onnx")
    rejects(b.UnsafePath, "golden/link.onnx", "symbolic link", bundle=signed, keys=keys)


def test_listed_file_replaced_by_symlink(tmp_path, signed, keys):
    outside = tmp_path / "outside.yaml"
    outside.write_bytes((signed / "catalog.yaml").read_bytes())
    (signed / "catalog.yaml").unlink()
    os.symlink(outside, signed / "catalog.yaml")
    rejects(b.UnsafePath, "catalog.yaml", "symbolic link", bundle=signed, keys=keys)


def test_symlinked_directory(tmp_path, signed, keys):
    os.symlink(tmp_path / "keys", signed / "more")
    rejects(b.UnsafePath, "more", "symbolic link", bundle=signed, keys=keys)


def test_hard_link(signed, keys):
    os.link(signed / "scorer.onnx", signed.parent / "scorer-copy.onnx")
    rejects(b.UnsafePath, "scorer.onnx", "hard link", bundle=signed, keys=keys)


# ---------------------------------------------------------------- policy

def test_expired(signed, keys):
    rejects(b.ExpiredManifest, "expired", "2025-03-31T12:00:00Z",
            bundle=signed, keys=keys, now=NOW + timedelta(days=31))


@pytest.mark.parametrize("installed", [3, 4])
def test_version_not_newer(signed, keys, installed):
    rejects(b.VersionNotNewer, "version 3", f"installed version {installed}",
            bundle=signed, keys=keys, installed_version=installed)


def test_wrong_line(signed, keys):
    rejects(b.WrongLine, "'el-solar'", "'el-glass'", bundle=signed, keys=keys, line="el-glass")


def test_incompatible_input_spec(signed, keys):
    spec = {**INPUT, "image": [1, 3, 224, 224]}
    rejects(b.IncompatibleBundle, "input spec", "['image']", bundle=signed, keys=keys, input_spec=spec)
