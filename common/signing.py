"""The deployment's Ed25519 key, and signatures over audit reports.

A report is signed over its *canonical JSON* (:func:`canonical_json`): the report body encoded
with sorted keys, no whitespace, UTF-8 (``ensure_ascii=False``) and floats as Python's
``repr`` (the shortest string that reads back as the same double). These are the same bytes on
every machine, so whoever holds the report as JSON and the deployment's public key can check
it (``bulwark verify``), however the JSON was re-indented or its keys reordered on the way.

The envelope (:func:`sign_report`)::

    {"algorithm": "ed25519",
     "key_id": first 16 hex digits of sha256(raw 32-byte public key),
     "signature": base64url of the 64-byte signature, without padding,
     "signed": "canonical JSON of the report body"}

The private key is a PEM (PKCS8) file: ``BULWARK_SIGNING_KEY_FILE``, or, when that is unset
outside production, ``<data_dir>/signing-key.pem``, created on first use with mode 0600
(:func:`load_or_create_private_key`). Only the API process reads it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from common.settings import Settings

ALGORITHM = "ed25519"
SIGNED = "canonical JSON of the report body"
DEFAULT_KEY_NAME = "signing-key.pem"


class SigningKeyError(RuntimeError):
    """The signing key is missing, unreadable or not an Ed25519 key."""


def canonical_json(body: dict[str, Any]) -> bytes:
    """``body`` as the bytes that are signed: the same on every machine.

    Keys sorted, no whitespace, UTF-8 without escaping non-ASCII characters, floats as
    Python's ``repr`` (``json`` writes them so); NaN and infinities are refused, as JSON has
    none.
    """
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of the public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_pem(public_key: Ed25519PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def key_id(public_key: Ed25519PublicKey) -> str:
    """The first 16 hex digits of the sha256 of the raw public key."""
    return hashlib.sha256(raw_public_key(public_key)).hexdigest()[:16]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_report(body: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, str]:
    """The signature envelope over ``body``'s canonical JSON."""
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(key.public_key()),
        "signature": _b64url(key.sign(canonical_json(body))),
        "signed": SIGNED,
    }


def verify_report(
    body: dict[str, Any], envelope: dict[str, Any], public_key: Ed25519PublicKey
) -> bool:
    """Whether ``envelope`` is a valid signature of ``body`` by ``public_key``.

    False for another algorithm, another key's id, an undecodable signature or one that does
    not match the body's canonical JSON.
    """
    if envelope.get("algorithm") != ALGORITHM or envelope.get("key_id") != key_id(public_key):
        return False
    signature = envelope.get("signature")
    if not isinstance(signature, str):
        return False
    try:
        public_key.verify(_unb64url(signature), canonical_json(body))
    except (InvalidSignature, binascii.Error, ValueError):
        return False
    return True


def public_key_record(public_key: Ed25519PublicKey) -> dict[str, str]:
    """What ``GET /.well-known/bulwark-signing-key`` answers."""
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(public_key),
        "public_key": base64.b64encode(raw_public_key(public_key)).decode("ascii"),
        "public_key_pem": public_key_pem(public_key),
    }


def read_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM (PKCS8) file."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        raise SigningKeyError(f"cannot read the signing key {path}: {error}") from error
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"the signing key {path} is not an Ed25519 key")
    return key


def _create_private_key(path: Path) -> None:
    """A new key at ``path`` (mode 0600), unless another process wrote one first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Written whole under a temporary name (mkstemp creates it 0600), then linked into place:
    # a concurrent reader never sees half a key, and the first of two writers wins.
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=".signing-key-")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
        with contextlib.suppress(FileExistsError):
            os.link(partial, path)
    finally:
        os.unlink(partial)


def load_or_create_private_key(settings: Settings) -> Ed25519PrivateKey:
    """The deployment's key: ``settings.signing_key_file``, or the one under ``data_dir``.

    In production an unset ``BULWARK_SIGNING_KEY_FILE`` is an error (a key that appears on one
    machine's disk would differ between replicas and vanish with the container).
    """
    if settings.signing_key_file is not None:
        return read_private_key(settings.signing_key_file)
    if settings.environment == "production":
        raise SigningKeyError(
            "BULWARK_ENVIRONMENT=production needs BULWARK_SIGNING_KEY_FILE: the path of the "
            "deployment's Ed25519 private key (PEM, PKCS8), e.g. made with "
            "`openssl genpkey -algorithm ed25519 -out signing-key.pem`"
        )
    path = settings.data_dir / DEFAULT_KEY_NAME
    if not path.exists():
        _create_private_key(path)
    return read_private_key(path)


def read_public_key(text: str) -> Ed25519PublicKey:
    """A public key from a PEM, or from the JSON the well-known route answers.

    Raises ``ValueError`` when ``text`` is neither.
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        record = json.loads(stripped)
        if not isinstance(record, dict) or not isinstance(record.get("public_key"), str):
            raise ValueError("the JSON has no public_key field")
        if record.get("algorithm", ALGORITHM) != ALGORITHM:
            raise ValueError(f"the key's algorithm is {record['algorithm']}, not {ALGORITHM}")
        raw = base64.b64decode(record["public_key"], validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    key = serialization.load_pem_public_key(stripped.encode("ascii"))
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the PEM is not an Ed25519 public key")
    return key
