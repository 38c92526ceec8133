"""did:key for Ed25519: parse DIDs / verification method ids, and build DID documents."""

from __future__ import annotations

from typing import Any

from sdk.identity.errors import ResolutionError
from sdk.identity.hazmat.multibase import ED25519_PUB, KEY_B58_CHARS, is_canonical_b58
from sdk.identity.keys import InvalidKey, PublicKey

#: Longest did:key DID URL accepted: ``did:key:z<47>#z<47>`` (an Ed25519 one is 56 + 1 + 48).
MAX_DID_KEY_CHARS = 2 * (len("did:key:z") + KEY_B58_CHARS)


def public_key_from_did_key(did_or_vm: str) -> PublicKey:
    """The Ed25519 key inside ``did:key:z6Mk...`` or ``did:key:z6Mk...#z6Mk...``.

    The length is checked before any decoding, so hostile input costs nothing.
    """
    if not isinstance(did_or_vm, str) or not did_or_vm.startswith("did:key:"):
        raise ResolutionError(f"not a did:key identifier: {did_or_vm!r}"[:120])
    if len(did_or_vm) > MAX_DID_KEY_CHARS:
        raise ResolutionError(f"did:key identifier longer than {MAX_DID_KEY_CHARS} characters")
    did, _, fragment = did_or_vm.partition("#")
    ident = did[len("did:key:"):]
    if fragment and fragment != ident:
        raise ResolutionError(f"unknown verification method fragment #{fragment} for {did}")
    try:
        pub = PublicKey.from_multibase(ident)
    except InvalidKey as exc:
        raise ResolutionError(f"did:key does not hold an Ed25519 key: {exc}") from exc
    if is_canonical_b58(ident[1:], ED25519_PUB + pub.raw):
        with_identifiers(pub, did)
    return pub


def with_identifiers(pub: PublicKey, did: str) -> PublicKey:
    """Remember ``did`` (the canonical did:key of ``pub``) as its ``did``/``multibase``/VM id.

    Saves re-encoding base58 when they are read; the caller vouches that ``did`` is exactly what
    ``pub.did`` would compute (a decoded canonical did:key, or one checked before).
    """
    ident = did[len("did:key:"):]
    cached = pub.__dict__  # the cached_property slots
    cached["multibase"] = ident
    cached["did"] = did
    cached["verification_method"] = f"{did}#{ident}"
    return pub


def did_key_document(did: str) -> dict[str, Any]:
    """Resolve a did:key to its DID document (Ed25519 VM + derived X25519 keyAgreement)."""
    pub = public_key_from_did_key(did.partition("#")[0])
    vm = pub.verification_method
    ka = f"{pub.did}#{pub.x25519_multibase}"
    return {
        "@context": [
            "https://www.w3.org/ns/did/v1",
            "https://w3id.org/security/multikey/v1",
        ],
        "id": pub.did,
        "verificationMethod": [
            {"id": vm, "type": "Multikey", "controller": pub.did, "publicKeyMultibase": pub.multibase},
        ],
        "authentication": [vm],
        "assertionMethod": [vm],
        "capabilityInvocation": [vm],
        "capabilityDelegation": [vm],
        "keyAgreement": [
            {"id": ka, "type": "Multikey", "controller": pub.did, "publicKeyMultibase": pub.x25519_multibase},
        ],
    }


__all__ = ["public_key_from_did_key", "did_key_document", "with_identifiers", "MAX_DID_KEY_CHARS"]
