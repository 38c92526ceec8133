"""W3C Data Integrity ``DataIntegrityProof`` with the ``eddsa-jcs-2022`` cryptosuite (vc-di-eddsa).

hashData = SHA-256(JCS(proofConfig)) || SHA-256(JCS(document without proof));
proofValue = base58btc multibase of the Ed25519 signature over hashData. The proof config
carries the document's ``@context``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sdk.identity.datetimes import format_datetime, parse_datetime
from sdk.identity.errors import (
    InvalidSignature,
    KeyNotAuthorized,
    MalformedError,
    UnsupportedProof,
    WrongProofPurpose,
)
from sdk.identity.hazmat.ed25519 import verify_detached
from sdk.identity.hazmat.jcs import canonicalize
from sdk.identity.hazmat.multibase import b58_length_bound, multibase_decode, multibase_encode
from sdk.identity.keys import Key
from sdk.identity.resolver import ResolvedKey, Resolver

log = logging.getLogger(__name__)

PROOF_TYPE = "DataIntegrityProof"
CRYPTOSUITE = "eddsa-jcs-2022"


@functools.lru_cache(maxsize=1024)          # the hot proofs (see hazmat/ed25519.py's bound)
def _decode_signature(proof_value: str) -> bytes:
    return multibase_decode(proof_value, max_len=b58_length_bound(64))


def _jcs(value: Any) -> bytes:
    try:
        return canonicalize(value)
    except ValueError as exc:
        raise MalformedError(f"cannot canonicalize: {exc}") from exc


def hash_data(document: Mapping[str, Any], proof_config: Mapping[str, Any]) -> bytes:
    """The 64 bytes that get signed: SHA-256(JCS(proofConfig)) || SHA-256(JCS(document))."""
    return hashlib.sha256(_jcs(proof_config)).digest() + hashlib.sha256(_jcs(document)).digest()


class DataIntegrityProof:
    """Create and verify ``DataIntegrityProof`` / ``eddsa-jcs-2022`` proofs on JSON documents."""

    type = PROOF_TYPE
    cryptosuite = CRYPTOSUITE

    @staticmethod
    def proof_config(
        document: Mapping[str, Any],
        *,
        verification_method: str,
        proof_purpose: str = "assertionMethod",
        created: str | datetime | None = None,
        challenge: str | None = None,
        domain: str | None = None,
    ) -> dict[str, Any]:
        """The proof options that get hashed (everything but ``proofValue``)."""
        config: dict[str, Any] = {
            "type": PROOF_TYPE,
            "cryptosuite": CRYPTOSUITE,
            "created": created if isinstance(created, str) else format_datetime(created),
            "verificationMethod": verification_method,
            "proofPurpose": proof_purpose,
        }
        parse_datetime(config["created"])
        if challenge is not None:
            config["challenge"] = challenge
        if domain is not None:
            config["domain"] = domain
        if "@context" in document:
            config["@context"] = document["@context"]
        return config

    @classmethod
    def sign(
        cls,
        document: Mapping[str, Any],
        key: Key,
        *,
        verification_method: str | None = None,
        proof_purpose: str = "assertionMethod",
        created: str | datetime | None = None,
        challenge: str | None = None,
        domain: str | None = None,
    ) -> dict[str, Any]:
        """Return a copy of ``document`` with an ``eddsa-jcs-2022`` proof added."""
        if not isinstance(document, Mapping):
            raise TypeError("document must be a JSON object (dict)")
        if not isinstance(key, Key):
            raise TypeError("key must be a sdk.identity.Key")
        if "proof" in document:
            raise ValueError("document already has a proof")
        config = cls.proof_config(
            document,
            verification_method=verification_method or key.verification_method,
            proof_purpose=proof_purpose,
            created=created,
            challenge=challenge,
            domain=domain,
        )
        signature = key.sign(hash_data(document, config))
        proof = dict(config)
        proof["proofValue"] = multibase_encode(signature)
        secured = dict(document)
        secured["proof"] = proof
        return secured

    @staticmethod
    def verify(
        secured: Mapping[str, Any],
        *,
        resolver: Resolver,
        proof_purpose: str = "assertionMethod",
        controller: str | None = None,
    ) -> tuple[ResolvedKey, dict[str, Any]]:
        """Verify the proof on ``secured``; return (resolved key, proof) or raise an IdentityError.

        ``controller``, when given, must control the verification method (issuer / holder).
        """
        if not isinstance(secured, Mapping):
            raise MalformedError("secured document must be a JSON object")
        proof = secured.get("proof")
        if isinstance(proof, list) and len(proof) == 1:
            proof = proof[0]
        if not isinstance(proof, Mapping):
            raise MalformedError("missing or unsupported proof (need exactly one proof object)")
        if proof.get("type") != PROOF_TYPE or proof.get("cryptosuite") != CRYPTOSUITE:
            raise UnsupportedProof(
                f"unsupported proof {proof.get('type')!r}/{proof.get('cryptosuite')!r}"
            )
        proof_value = proof.get("proofValue")
        vm_id = proof.get("verificationMethod")
        if not isinstance(proof_value, str) or not isinstance(vm_id, str):
            raise MalformedError("proof needs string proofValue and verificationMethod")
        if len(proof_value) > 1 + b58_length_bound(64):
            raise MalformedError("proofValue is longer than an Ed25519 signature")
        try:
            signature = _decode_signature(proof_value)
        except ValueError as exc:
            raise MalformedError(f"bad proofValue: {exc}") from exc
        if len(signature) != 64:
            raise MalformedError("proofValue is not a 64-byte Ed25519 signature")
        if proof.get("proofPurpose") != proof_purpose:
            raise WrongProofPurpose(
                f"proofPurpose is {proof.get('proofPurpose')!r}, expected {proof_purpose!r}"
            )
        if "created" in proof:
            parse_datetime(proof["created"])
        options = {k: v for k, v in proof.items() if k != "proofValue"}
        unsecured = {k: v for k, v in secured.items() if k != "proof"}
        # The spec only needs the document @context to *start with* the proof's; we require
        # equality so that appending a context is also a detected change.
        if "@context" in options and options["@context"] != unsecured.get("@context"):
            raise InvalidSignature("document @context differs from the proof @context")
        resolved = resolver.resolve(vm_id)
        if not verify_detached(resolved.public_key.raw, signature, hash_data(unsecured, options)):
            raise InvalidSignature(f"eddsa-jcs-2022 signature by {vm_id} does not verify")
        if proof_purpose not in resolved.purposes:
            raise KeyNotAuthorized(f"{vm_id} is not authorized for {proof_purpose}")
        if controller is not None and resolved.controller != controller:
            raise KeyNotAuthorized(f"{vm_id} is controlled by {resolved.controller}, not {controller}")
        return resolved, dict(proof)


__all__ = ["DataIntegrityProof", "hash_data", "PROOF_TYPE", "CRYPTOSUITE"]
