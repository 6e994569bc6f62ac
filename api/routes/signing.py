"""The deployment's public signing key (no authentication): it checks every report's signature."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import SigningKeyDep
from api.schemas import SigningKeyPublic
from common.signing import public_key_record

router = APIRouter(tags=["signing"])


@router.get(
    "/.well-known/bulwark-signing-key",
    operation_id="getSigningKey",
    summary="The public key that signs reports",
)
def signing_key(key: SigningKeyDep) -> SigningKeyPublic:
    """The Ed25519 public key that signs this deployment's audit reports (``bulwark verify``)."""
    return SigningKeyPublic.model_validate(public_key_record(key.public_key()))
