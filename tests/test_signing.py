"""Report signatures (common.signing): canonical JSON, sign and verify, the key file."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.settings import Settings
from common.signing import (
    SigningKeyError,
    canonical_json,
    key_id,
    load_or_create_private_key,
    public_key_pem,
    public_key_record,
    read_public_key,
    sign_report,
    verify_report,
)

BODY = {
    "schema_version": "bulwark-audit/2",
    "model": {"arch": "convnet", "name": "Zürich ✓"},
    "attacks": {"fc": {"asr": 0.3, "successes": 3, "asr_wilson95": [0.1, 0.61]}},
    "seed": 0,
    "pre_acc": None,
}


def test_canonical_json_is_sorted_compact_utf8() -> None:
    text = canonical_json(BODY).decode("utf-8")
    assert text.startswith('{"attacks":{"fc":{"asr":0.3,"asr_wilson95":[0.1,0.61],')
    assert " " not in text.replace("Zürich ✓", "")
    assert "Zürich ✓" in text  # not escaped
    assert canonical_json({"x": 1e-7, "y": 1.0, "z": 1}) == b'{"x":1e-07,"y":1.0,"z":1}'


def test_canonical_json_ignores_key_order_and_whitespace() -> None:
    reordered = json.loads(json.dumps(dict(reversed(list(BODY.items())))))
    indented = json.loads(json.dumps(BODY, indent=4, ensure_ascii=True))
    assert canonical_json(reordered) == canonical_json(indented) == canonical_json(BODY)


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"asr": float("nan")})


def test_sign_verify_round_trip_through_json() -> None:
    key = Ed25519PrivateKey.generate()
    envelope = sign_report(BODY, key)
    assert envelope["algorithm"] == "ed25519" and len(envelope["key_id"]) == 16
    assert envelope["key_id"] == key_id(key.public_key())
    # What a client holds: the body and envelope after a trip through indented JSON.
    held = json.loads(json.dumps({"body": BODY, "signature": envelope}, indent=2))
    assert verify_report(held["body"], held["signature"], key.public_key())


@pytest.mark.parametrize(
    "change",
    [
        lambda b: b["attacks"]["fc"].update(asr=0.31),
        lambda b: b["attacks"]["fc"].update(successes=4),
        lambda b: b["attacks"]["fc"]["asr_wilson95"].__setitem__(0, 0.0),
        lambda b: b["model"].update(arch="resnet18"),
        lambda b: b.update(extra=1),
        lambda b: b.pop("seed"),
    ],
)
def test_a_changed_body_fails(change) -> None:  # type: ignore[no-untyped-def]
    key = Ed25519PrivateKey.generate()
    envelope = sign_report(BODY, key)
    changed = json.loads(json.dumps(BODY))
    change(changed)
    assert not verify_report(changed, envelope, key.public_key())


def test_another_key_or_a_mangled_envelope_fails() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    envelope = sign_report(BODY, key)
    assert not verify_report(BODY, envelope, other.public_key())
    # Another key's signature under this key's id: still invalid.
    forged = {**sign_report(BODY, other), "key_id": envelope["key_id"]}
    assert not verify_report(BODY, forged, key.public_key())
    assert not verify_report(BODY, {**envelope, "signature": "!!"}, key.public_key())
    assert not verify_report(BODY, {**envelope, "algorithm": "rsa"}, key.public_key())
    assert not verify_report(BODY, {}, key.public_key())


def test_public_key_reads_from_pem_and_well_known_json() -> None:
    public = Ed25519PrivateKey.generate().public_key()
    record = public_key_record(public)
    assert record["public_key_pem"] == public_key_pem(public)
    for text in (public_key_pem(public), json.dumps(record)):
        assert key_id(read_public_key(text)) == record["key_id"]
    for bad in ("not a key", "{}", '{"public_key": "AAAA"}'):
        with pytest.raises(ValueError):
            read_public_key(bad)


def test_embedded_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = load_or_create_private_key(settings)
    path = tmp_path / "data" / "signing-key.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"BEGIN PRIVATE KEY" in path.read_bytes()  # PKCS8
    assert key_id(load_or_create_private_key(settings).public_key()) == key_id(first.public_key())
    named = Settings(data_dir=tmp_path / "other", signing_key_file=path)
    assert key_id(load_or_create_private_key(named).public_key()) == key_id(first.public_key())
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []


def test_production_needs_a_key_file(tmp_path: Path) -> None:
    settings = Settings(
        environment="production",
        DATABASE_URL="postgresql+psycopg://x@y/z",
        BROKER_URL="redis://y:6379/0",
        data_dir=tmp_path,
    )
    with pytest.raises(SigningKeyError, match="BULWARK_SIGNING_KEY_FILE"):
        load_or_create_private_key(settings)
    assert not (tmp_path / "signing-key.pem").exists()
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_or_create_private_key(
            settings.model_copy(update={"signing_key_file": tmp_path / "missing.pem"})
        )
