"""Presentations: DID Auth with challenge/domain, embedded credentials verified in full."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdk.identity import (
    HolderMismatch,
    Key,
    TrustPolicy,
    WrongChallenge,
    verify_presentation,
)
from sdk.identity import create_presentation as _create_presentation
from sdk.identity.hazmat.data_integrity import DataIntegrityProof
from sdk.identity.presentations import envelope_jwt
from tests.fixtures.identity import NOW
from tests.identity.test_credentials import _mutate, _paths

ANY = TrustPolicy.ANY

FORMATS = ["eddsa-jcs-2022", "jwt"]


def create_presentation(*args: Any, **kwargs: Any) -> Any:
    """Presentations made at the fixed test clock (a VP-JWT's nbf is its creation time)."""
    kwargs.setdefault("created", "2026-06-01T12:00:00Z")
    return _create_presentation(*args, **kwargs)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("vc_format", FORMATS)
@pytest.mark.parametrize("vp_format", FORMATS)
def test_round_trip(make_credential, holder_key: Key, issuer_key: Key, version: int, vc_format: str,
                    vp_format: str) -> None:
    creds = [make_credential(version=version, proof_format=vc_format),
             make_credential(version=version, proof_format="eddsa-jcs-2022")]
    vp = create_presentation(creds, holder_key, challenge="nonce-1", domain="coordinator.example",
                             proof_format=vp_format)
    result = verify_presentation(vp, challenge="nonce-1", domain="coordinator.example", now=NOW,
                                 trust=TrustPolicy({issuer_key.did: ["DeviceCredential"]}))
    assert result.verified, result.messages
    assert result.holder == holder_key.did
    assert result.proof_format == vp_format
    assert len(result.credentials) == 2
    assert all(c.verified and c.issuer == issuer_key.did for c in result.credentials)
    assert [c.proof_format for c in result.credentials] == [vc_format, "eddsa-jcs-2022"]
    if vp_format == "eddsa-jcs-2022":
        assert vp["@context"][0].endswith("/v1" if version == 1 else "/v2")
        if vc_format == "jwt":
            first = vp["verifiableCredential"][0]
            assert isinstance(first, str) if version == 1 else first["type"] == "EnvelopedVerifiableCredential"


def test_did_auth_without_credentials(holder_key: Key) -> None:
    vp = create_presentation([], holder_key, challenge="c")
    result = verify_presentation(vp, challenge="c", now=NOW, trust=ANY)
    assert result.verified and result.credentials == [] and result.holder == holder_key.did


@pytest.mark.parametrize("vp_format", FORMATS)
def test_challenge_and_domain_must_match(make_credential, holder_key: Key, vp_format: str) -> None:
    vp = create_presentation([make_credential()], holder_key, challenge="c1", domain="d1", proof_format=vp_format)
    assert verify_presentation(vp, challenge="c2", domain="d1", now=NOW, trust=ANY).errors == ["wrong_challenge"]
    assert verify_presentation(vp, challenge="c1", domain="d2", now=NOW, trust=ANY).errors == ["wrong_domain"]
    assert verify_presentation(vp, challenge="c1", now=NOW, trust=ANY).errors == ["wrong_domain"]
    no_domain = create_presentation([make_credential()], holder_key, challenge="c1", proof_format=vp_format)
    assert verify_presentation(no_domain, challenge="c1", domain="d1", now=NOW, trust=ANY).errors == ["wrong_domain"]
    with pytest.raises(WrongChallenge):
        verify_presentation(vp, challenge="other", domain="d1", now=NOW, trust=ANY).raise_for_errors()
    with pytest.raises(ValueError):
        verify_presentation(vp, challenge="", now=NOW, trust=ANY)
    with pytest.raises(ValueError):
        create_presentation([], holder_key, challenge="")


def test_missing_challenge_in_proof_is_wrong_challenge(holder_key: Key) -> None:
    vp = {"@context": ["https://www.w3.org/ns/credentials/v2"], "type": ["VerifiablePresentation"],
          "holder": holder_key.did}
    signed = DataIntegrityProof.sign(vp, holder_key, proof_purpose="authentication")
    assert verify_presentation(signed, challenge="c", now=NOW, trust=ANY).errors == ["wrong_challenge"]


@pytest.mark.parametrize("vp_format", FORMATS)
def test_subject_must_be_holder(make_credential, holder_key: Key, other_key: Key, vp_format: str) -> None:
    someone_elses = make_credential(subject=other_key.did)
    vp = create_presentation([someone_elses], holder_key, challenge="c", proof_format=vp_format)
    result = verify_presentation(vp, challenge="c", now=NOW, trust=ANY)
    assert result.errors == ["holder_mismatch"]
    assert result.credentials[0].verified  # the credential itself is fine
    with pytest.raises(HolderMismatch):
        result.raise_for_errors()


@pytest.mark.parametrize("vp_format", FORMATS)
def test_embedded_credentials_are_verified_in_full(make_credential, holder_key: Key, issuer_key: Key,
                                                   vp_format: str) -> None:
    good = make_credential()
    expired = make_credential(validUntil="2025-01-01T00:00:00Z")
    tampered = copy.deepcopy(good)
    tampered["credentialSubject"]["deviceId"] = "dev-evil"
    # The holder signs over the tampered credential: the VP proof is valid, the VC proof is not.
    vp = create_presentation([good, tampered, expired], holder_key, challenge="c", proof_format=vp_format)
    result = verify_presentation(vp, challenge="c", now=NOW, trust=ANY)
    assert not result.verified
    assert result.errors == ["bad_signature", "expired"]
    assert [c.verified for c in result.credentials] == [True, False, False]
    untrusted = verify_presentation(create_presentation([good], holder_key, challenge="c", proof_format=vp_format),
                                    challenge="c", now=NOW, trust=TrustPolicy({"did:key:zOther": ["*"]}))
    assert untrusted.errors == ["untrusted_issuer"]


def test_presentation_signed_by_someone_else(make_credential, holder_key: Key, other_key: Key) -> None:
    vp = create_presentation([make_credential()], other_key, challenge="c", holder=holder_key.did)
    assert verify_presentation(vp, challenge="c", now=NOW, trust=ANY).errors == ["key_not_authorized"]
    jwt_vp = create_presentation([make_credential()], other_key, challenge="c", holder=holder_key.did,
                                 proof_format="jwt")
    assert verify_presentation(jwt_vp, challenge="c", now=NOW, trust=ANY).errors == ["key_not_authorized"]


def test_presentation_proof_purpose_must_be_authentication(holder_key: Key) -> None:
    vp = {"@context": ["https://www.w3.org/ns/credentials/v2"], "type": ["VerifiablePresentation"],
          "holder": holder_key.did}
    signed = DataIntegrityProof.sign(vp, holder_key, proof_purpose="assertionMethod", challenge="c")
    assert verify_presentation(signed, challenge="c", now=NOW, trust=ANY).errors == ["wrong_proof_purpose"]


def test_credential_proof_purpose_must_be_assertion(holder_key: Key) -> None:
    from tests.fixtures.identity import unsigned_credential

    cred = {**unsigned_credential(holder_key.did), "issuer": holder_key.did}
    auth_signed = DataIntegrityProof.sign(cred, holder_key, proof_purpose="authentication")
    vp = create_presentation([auth_signed], holder_key, challenge="c")
    assert verify_presentation(vp, challenge="c", now=NOW, trust=ANY).errors == ["wrong_proof_purpose"]


@pytest.mark.parametrize("bad", [None, 3, "x.y.z", {}, {"@context": ["https://www.w3.org/ns/credentials/v2"]},
                                 {"@context": ["https://www.w3.org/ns/credentials/v2"], "holder": "did:x",
                                  "proof": {"type": "DataIntegrityProof"}}])
def test_malformed_presentations(bad: Any) -> None:
    result = verify_presentation(bad, challenge="c", now=NOW, trust=ANY)
    assert not result.verified and result.errors[0] in {"malformed", "unsupported_proof"}


def test_bad_envelope_is_malformed(holder_key: Key) -> None:
    env = {"@context": "https://www.w3.org/ns/credentials/v2", "id": "data:text/plain,hi",
           "type": "EnvelopedVerifiableCredential"}
    vp = create_presentation([env], holder_key, challenge="c")
    assert verify_presentation(vp, challenge="c", now=NOW, trust=ANY).errors == ["malformed"]
    assert envelope_jwt("a.b.c")["id"] == "data:application/vc+jwt,a.b.c"


@pytest.fixture(scope="module")
def signed_vp() -> dict:
    from sdk.identity import issue_credential
    from tests.fixtures.identity import unsigned_credential

    issuer, holder = Key.from_seed(bytes(range(32))), Key.from_seed(bytes(range(32, 64)))
    cred = issue_credential(unsigned_credential(holder.did), issuer, created="2024-01-01T00:00:00Z")
    return create_presentation([cred], holder, challenge="c", domain="d", created="2026-06-01T12:00:00Z")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_change_to_a_presentation_fails(signed_vp: dict, data: st.DataObject) -> None:
    path = data.draw(st.sampled_from(_paths(signed_vp)))
    tampered = _mutate(signed_vp, path, data.draw(st.integers(0, 2)))
    if tampered == signed_vp:
        return
    assert not verify_presentation(tampered, challenge="c", domain="d", now=NOW, trust=ANY).verified, path
