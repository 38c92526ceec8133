"""Keys, multibase/multicodec, did:key documents, JWK, X25519 derivation, reason codes."""

from __future__ import annotations

import nacl.bindings
import pytest

from sdk.errors import IdentityError
from sdk.identity import (
    InvalidKey,
    InvalidSignature,
    Key,
    PublicKey,
    ResolutionError,
    did_key_document,
    public_key_from_did_key,
)
from sdk.identity.errors import ERRORS_BY_REASON
from sdk.identity.hazmat.keys import x25519_private
from sdk.identity.hazmat.multibase import b58decode, b58encode, multibase_decode
from sdk.identity.results import VerificationResult
from tests.fixtures.identity import load_vectors


def test_w3c_key_pair_multibase() -> None:
    vec = load_vectors("eddsa_jcs_2022")[0]
    key = Key.from_multibase(vec["privateKeyMultibase"])
    assert key.private_key_multibase == vec["privateKeyMultibase"]
    assert key.public_key_multibase == vec["publicKeyMultibase"]
    assert key.did == "did:key:" + vec["publicKeyMultibase"]
    raw = multibase_decode(key.private_key_multibase)
    assert raw[:2] == b"\x80\x26" and len(raw) == 34
    assert multibase_decode(key.public_key_multibase)[:2] == b"\xed\x01"


def test_sign_verify_and_tamper() -> None:
    key = Key.generate()
    sig = key.sign(b"hello")
    key.public.verify(sig, b"hello")
    with pytest.raises(InvalidSignature):
        key.public.verify(sig, b"hellO")
    assert not key.public.is_valid(sig[:-1] + bytes([sig[-1] ^ 1]), b"hello")


def test_jwk_round_trip() -> None:
    key = Key.from_seed(bytes(range(32)))
    jwk = key.to_jwk(private=True)
    assert Key.from_jwk(jwk) == key
    assert PublicKey.from_jwk(key.to_jwk()) == key.public
    with pytest.raises(InvalidKey):
        Key.from_jwk({**jwk, "x": Key.generate().to_jwk()["x"]})
    with pytest.raises(InvalidKey):
        PublicKey.from_jwk({"kty": "EC", "crv": "P-256", "x": "AA"})


def test_did_key_document_and_x25519() -> None:
    key = Key.generate()
    doc = did_key_document(key.did)
    assert doc["id"] == key.did
    assert doc["assertionMethod"] == doc["authentication"] == [key.verification_method]
    ka = doc["keyAgreement"][0]
    assert ka["publicKeyMultibase"] == key.public.x25519_multibase
    # both sides derive the same shared secret from the Ed25519-derived X25519 keys
    other = Key.generate()
    assert nacl.bindings.crypto_scalarmult(x25519_private(key), other.x25519_public) == \
        nacl.bindings.crypto_scalarmult(x25519_private(other), key.x25519_public)
    assert public_key_from_did_key(key.verification_method) == key.public
    for bad in ("did:web:x", f"{key.did}#other", "did:key:zQ3sh"):
        with pytest.raises(ResolutionError):
            public_key_from_did_key(bad)


def test_base58_leading_zeros() -> None:
    for data in (b"", b"\0", b"\0\0\x01", bytes(range(40))):
        assert b58decode(b58encode(data)) == data
    with pytest.raises(ValueError):
        b58decode("0OIl")


def test_reason_codes_are_distinct_and_strict_mode_maps_them() -> None:
    reasons = [cls.reason for cls in ERRORS_BY_REASON.values()]
    assert len(reasons) == len(set(reasons)) == 16
    for reason, cls in ERRORS_BY_REASON.items():
        assert issubclass(cls, IdentityError)
        result = VerificationResult()
        result.add_error(reason, "x")
        with pytest.raises(cls) as info:
            result.raise_for_errors()
        assert info.value.reason == reason
