"""DataIntegrityProof / eddsa-jcs-2022: the W3C vc-di-eddsa vector, and tampering."""

from __future__ import annotations

import copy

import pytest

from sdk.identity import Key, StaticResolver
from sdk.identity.errors import (
    InvalidSignature,
    KeyNotAuthorized,
    MalformedError,
    ResolutionError,
    UnsupportedProof,
    WrongProofPurpose,
)
from sdk.identity.hazmat.data_integrity import DataIntegrityProof
from sdk.identity.hazmat.jcs import canonicalize_str
from tests.fixtures.identity import load_vectors

VECTORS = load_vectors("eddsa_jcs_2022")


@pytest.mark.parametrize("vec", VECTORS, ids=lambda v: v["verificationMethod"])
def test_w3c_vector_reproduced_byte_for_byte(vec: dict) -> None:
    key = Key.from_multibase(vec["privateKeyMultibase"])
    assert key.public_key_multibase == vec["publicKeyMultibase"]
    assert canonicalize_str(vec["unsecuredDocument"]) == vec["canonicalDocument"]
    secured = DataIntegrityProof.sign(vec["unsecuredDocument"], key, verification_method=vec["verificationMethod"],
                                      created=vec["created"])
    assert secured["proof"]["proofValue"] == vec["proofValue"]
    assert secured["proof"]["@context"] == vec["unsecuredDocument"]["@context"]


@pytest.mark.parametrize("vec", VECTORS, ids=lambda v: v["verificationMethod"])
def test_w3c_vector_verifies_and_detects_tampering(vec: dict) -> None:
    resolver = StaticResolver({vec["verificationMethod"]: vec["publicKeyMultibase"]})
    secured = {**vec["unsecuredDocument"], "proof": {
        "type": "DataIntegrityProof", "cryptosuite": "eddsa-jcs-2022", "created": vec["created"],
        "verificationMethod": vec["verificationMethod"], "proofPurpose": "assertionMethod",
        "@context": vec["unsecuredDocument"]["@context"], "proofValue": vec["proofValue"]}}
    resolved, _ = DataIntegrityProof.verify(secured, resolver=resolver,
                                            controller="https://vc.example/issuers/5678")
    assert resolved.public_key.multibase == vec["publicKeyMultibase"]
    tampered = copy.deepcopy(secured)
    tampered["credentialSubject"]["alumniOf"] = "Another School"
    with pytest.raises(InvalidSignature):
        DataIntegrityProof.verify(tampered, resolver=resolver)
    tampered = copy.deepcopy(secured)
    tampered["proof"]["created"] = "2023-02-24T23:36:39Z"
    with pytest.raises(InvalidSignature):
        DataIntegrityProof.verify(tampered, resolver=resolver)


def _signed(key: Key) -> dict:
    doc = {"@context": ["https://www.w3.org/ns/credentials/v2"], "type": ["VerifiableCredential"], "n": 1}
    return DataIntegrityProof.sign(doc, key, created="2025-01-01T00:00:00Z")


def test_proof_checks_each_have_their_reason(issuer_key: Key, other_key: Key) -> None:
    secured = _signed(issuer_key)
    resolver = StaticResolver()  # did:key only
    DataIntegrityProof.verify(secured, resolver=resolver, controller=issuer_key.did)

    with pytest.raises(WrongProofPurpose):
        DataIntegrityProof.verify(secured, resolver=resolver, proof_purpose="authentication")
    with pytest.raises(KeyNotAuthorized):
        DataIntegrityProof.verify(secured, resolver=resolver, controller=other_key.did)
    with pytest.raises(UnsupportedProof):
        DataIntegrityProof.verify({**secured, "proof": {**secured["proof"], "cryptosuite": "eddsa-rdfc-2022"}},
                                  resolver=resolver)
    with pytest.raises(MalformedError):
        DataIntegrityProof.verify({**secured, "proof": {**secured["proof"], "proofValue": "z0OIl"}},
                                  resolver=resolver)
    with pytest.raises(MalformedError):
        DataIntegrityProof.verify({**secured, "proof": {**secured["proof"], "created": "yesterday"}},
                                  resolver=resolver)
    with pytest.raises(MalformedError):
        DataIntegrityProof.verify({k: v for k, v in secured.items() if k != "proof"}, resolver=resolver)
    with pytest.raises(ResolutionError):
        DataIntegrityProof.verify(secured, resolver=_NoDidKey())
    forged = {**secured, "proof": {**secured["proof"], "verificationMethod": other_key.verification_method}}
    with pytest.raises(InvalidSignature):
        DataIntegrityProof.verify(forged, resolver=resolver)
    # the proof @context must be a prefix of the document's
    with pytest.raises(InvalidSignature):
        DataIntegrityProof.verify({**secured, "@context": ["https://www.w3.org/2018/credentials/v1"]},
                                  resolver=resolver)


class _NoDidKey:
    def resolve(self, verification_method: str):
        raise ResolutionError(f"cannot resolve {verification_method}")


def test_purpose_not_in_did_document_relationship(issuer_key: Key) -> None:
    secured = _signed(issuer_key)
    vm = issuer_key.verification_method
    only_auth = StaticResolver({vm: issuer_key.public_key_multibase}, purposes={"authentication"})
    with pytest.raises(KeyNotAuthorized):
        DataIntegrityProof.verify(secured, resolver=only_auth)


def test_sign_rejects_caller_mistakes(issuer_key: Key) -> None:
    with pytest.raises(TypeError):
        DataIntegrityProof.sign(["not", "a", "dict"], issuer_key)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DataIntegrityProof.sign(_signed(issuer_key), issuer_key)
