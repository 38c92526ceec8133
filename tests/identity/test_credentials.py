"""Issue and verify VCs: 1.1 and 2.0, eddsa-jcs-2022 and VC-JWT, every failure reason."""

from __future__ import annotations

import base64
import copy
import json
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdk.identity import (
    Expired,
    Key,
    StaticResolver,
    TrustPolicy,
    UntrustedIssuer,
    VerificationResult,
    issue_credential,
    verify_credential,
)
from sdk.identity.hazmat.data_integrity import DataIntegrityProof
from tests.fixtures.identity import NOW, unsigned_credential

ANY = TrustPolicy.ANY

FORMATS = ["eddsa-jcs-2022", "jwt"]
VERSIONS = [1, 2]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("proof_format", FORMATS)
def test_round_trip(make_credential, issuer_key: Key, holder_key: Key, version: int, proof_format: str) -> None:
    signed = make_credential(version=version, proof_format=proof_format)
    assert isinstance(signed, str if proof_format == "jwt" else dict)
    result = verify_credential(signed, now=NOW, trust=ANY)
    assert result.verified, result.messages
    assert result.errors == []
    assert result.issuer == issuer_key.did
    assert result.subject == holder_key.did
    assert result.types == ["VerifiableCredential", "DeviceCredential"]
    assert result.proof_format == proof_format
    assert result.verification_method == issuer_key.verification_method
    assert result.expires_at is not None and result.expires_at.year == 2030
    cred = result.credential
    assert cred["credentialSubject"]["limits"] == {"tokensPerMinute": 6000, "ratio": 0.25}
    assert cred["id"] == "urn:uuid:3978344f-8596-4c3a-a978-8fcaba3903c5"
    assert ("issuanceDate" in cred) == (version == 1) and ("validFrom" in cred) == (version == 2)
    assert result.raise_for_errors() is result


def test_jwt_claim_mapping(make_credential, issuer_key: Key, holder_key: Key) -> None:
    token = make_credential(version=1, proof_format="jwt")
    header_b64, payload_b64, _ = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=="))
    claims = json.loads(base64.urlsafe_b64decode(payload_b64 + "=="))
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": issuer_key.verification_method}
    assert claims["iss"] == issuer_key.did and claims["sub"] == holder_key.did
    assert claims["nbf"] == 1704067200 and claims["exp"] == 1893456000
    assert claims["jti"] == "urn:uuid:3978344f-8596-4c3a-a978-8fcaba3903c5"
    assert "issuer" not in claims["vc"] and "id" not in claims["vc"]["credentialSubject"]


def test_issuer_defaults_to_key_and_rejects_foreign_did_key(issuer_key: Key, other_key: Key) -> None:
    cred = unsigned_credential(issuer_key.did)
    assert issue_credential(cred, issuer_key)["issuer"] == issuer_key.did
    with pytest.raises(ValueError):
        issue_credential({**cred, "issuer": other_key.did}, issuer_key)
    with pytest.raises(ValueError):
        issue_credential(cred, issuer_key, proof_format="ldp")
    with pytest.raises(ValueError):
        issue_credential({**cred, "@context": ["https://example.com/ctx"]}, issuer_key)
    with pytest.raises(TypeError):
        issue_credential(cred, "not a key")  # type: ignore[arg-type]


@pytest.mark.parametrize("proof_format", FORMATS)
def test_https_issuer_with_static_resolver(issuer_key: Key, holder_key: Key, proof_format: str) -> None:
    issuer = "https://issuer.example/keys"
    vm = f"{issuer}#key-1"
    cred = unsigned_credential(holder_key.did, issuer=issuer)
    signed = issue_credential(cred, issuer_key, verification_method=vm, proof_format=proof_format)
    assert verify_credential(signed, resolver=StaticResolver({vm: issuer_key.public_key_multibase}), now=NOW, trust=ANY)
    missing = verify_credential(signed, now=NOW, trust=ANY)  # no resolver knows the https key
    assert missing.errors == ["unresolvable"]
    wrong_key = verify_credential(signed, resolver={vm: holder_key.public_key_multibase}, now=NOW, trust=ANY)
    assert wrong_key.errors == ["bad_signature"]


@pytest.mark.parametrize("proof_format", FORMATS)
def test_key_not_controlled_by_issuer(issuer_key: Key, holder_key: Key, proof_format: str) -> None:
    # Signed with a key whose controller is not the claimed (https) issuer.
    cred = unsigned_credential(holder_key.did, issuer="https://victim.example")
    signed = issue_credential(cred, issuer_key, proof_format=proof_format)
    assert verify_credential(signed, now=NOW, trust=ANY).errors == ["key_not_authorized"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("proof_format", FORMATS)
def test_validity_window_and_skew(make_credential, version: int, proof_format: str) -> None:
    signed = make_credential(version=version, proof_format=proof_format)
    start = NOW.replace(year=2024, month=1, day=1, hour=0)
    end = NOW.replace(year=2030, month=1, day=1, hour=0)
    assert verify_credential(signed, now=start - timedelta(seconds=30), trust=ANY).verified  # within default skew
    early = verify_credential(signed, now=start - timedelta(seconds=61), trust=ANY)
    assert early.errors == ["not_yet_valid"]
    assert verify_credential(signed, now=start - timedelta(hours=1), skew=timedelta(hours=2), trust=ANY).verified
    late = verify_credential(signed, now=end + timedelta(seconds=61), trust=ANY)
    assert late.errors == ["expired"]
    assert verify_credential(signed, now=(end + timedelta(seconds=59)).timestamp(), trust=ANY).verified
    assert verify_credential(signed, now=end, skew=0, trust=ANY).verified
    with pytest.raises(Expired):
        late.raise_for_errors()


@pytest.mark.parametrize("proof_format", FORMATS)
def test_trust_policy(make_credential, issuer_key: Key, other_key: Key, proof_format: str) -> None:
    signed = make_credential(proof_format=proof_format)
    ok = TrustPolicy({issuer_key.did: {"DeviceCredential", "InferenceAccessCredential"}})
    assert verify_credential(signed, now=NOW, trust=ok).verified
    wrong_type = TrustPolicy({issuer_key.did: {"InferenceAccessCredential"}})
    assert verify_credential(signed, now=NOW, trust=wrong_type).errors == ["untrusted_issuer"]
    other = TrustPolicy({other_key.did: {"DeviceCredential"}})
    res = verify_credential(signed, now=NOW, trust=other)
    assert res.errors == ["untrusted_issuer"]
    with pytest.raises(UntrustedIssuer):
        res.raise_for_errors()


def test_wrong_proof_purpose(issuer_key: Key, holder_key: Key) -> None:
    cred = {**unsigned_credential(holder_key.did), "issuer": issuer_key.did}
    signed = DataIntegrityProof.sign(cred, issuer_key, proof_purpose="authentication")
    assert verify_credential(signed, now=NOW, trust=ANY).errors == ["wrong_proof_purpose"]


def test_unsupported_proof(make_credential) -> None:
    signed = make_credential()
    signed["proof"] = {**signed["proof"], "type": "BbsBlsSignature2020"}  # no backend for it
    assert verify_credential(signed, now=NOW, trust=ANY).errors == ["unsupported_proof"]


@pytest.mark.parametrize(
    "garbage",
    [None, 42, "", "a.b", "a.b.c", "eyJhbGciOiJub25lIn0.e30.", [], {}, {"@context": 5},
     {"@context": ["https://www.w3.org/ns/credentials/v2"], "proof": {}},
     {"@context": ["https://www.w3.org/ns/credentials/v2"], "issuer": "did:key:z", "proof": []}],
)
def test_malformed_input_returns_result(garbage: Any) -> None:
    result = verify_credential(garbage, now=NOW, trust=ANY)
    assert isinstance(result, VerificationResult)
    assert not result.verified
    assert result.errors and set(result.errors) <= {"malformed", "unsupported_proof", "unresolvable"}


def test_malformed_shapes(make_credential, issuer_key: Key) -> None:
    base = unsigned_credential(issuer_key.did)
    for broken in ({k: v for k, v in base.items() if k != "credentialSubject"},
                   {**base, "type": ["DeviceCredential"]},
                   {**base, "validFrom": "not a date"}):
        signed = DataIntegrityProof.sign({**broken, "issuer": issuer_key.did}, issuer_key)
        assert verify_credential(signed, now=NOW, trust=ANY).errors == ["malformed"]
    v1 = unsigned_credential(issuer_key.did, version=1)
    del v1["issuanceDate"]
    signed = DataIntegrityProof.sign({**v1, "issuer": issuer_key.did}, issuer_key)
    assert verify_credential(signed, now=NOW, trust=ANY).errors == ["malformed"]


def test_bad_arguments_are_reported_not_raised(make_credential) -> None:
    assert verify_credential(make_credential(), now="yesterday", trust=ANY).errors == ["malformed"]  # type: ignore[arg-type]


# --- any change to any field of a signed credential fails verification -------------------------

def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: Any, path: tuple, how: int) -> Any:
    doc = copy.deepcopy(doc)
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    leaf, old = path[-1], parent[path[-1]]
    if how == 0:  # change the value
        if isinstance(old, str):
            new: Any = old + "x" if old else "x"
        elif isinstance(old, bool):
            new = not old
        elif isinstance(old, (int, float)):
            new = old + 1
        elif isinstance(old, list):
            new = [*old, "extra"]
        elif isinstance(old, dict):
            new = {**old, "extra": 1}
        else:
            new = "x"
        parent[leaf] = new
    elif how == 1 and isinstance(parent, dict):  # remove the member
        del parent[leaf]
    else:  # retype it
        parent[leaf] = None if old is not None else 0
    return doc


@pytest.fixture(scope="module")
def signed_di(issuer_key_module) -> dict:
    from tests.fixtures.identity import unsigned_credential as u

    key = issuer_key_module
    return issue_credential(u(Key.from_seed(bytes(range(32, 64))).did, version=2), key,
                            created="2024-01-01T00:00:00Z", credential_status=None)


@pytest.fixture(scope="module")
def issuer_key_module() -> Key:
    return Key.from_seed(bytes(range(32)))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_change_to_a_data_integrity_credential_fails(signed_di: dict, data: st.DataObject) -> None:
    paths = _paths(signed_di)
    path = data.draw(st.sampled_from(paths))
    how = data.draw(st.integers(0, 2))
    tampered = _mutate(signed_di, path, how)
    if tampered == signed_di:
        return
    result = verify_credential(tampered, now=NOW, trust=ANY)
    assert not result.verified, (path, how)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_change_to_a_jwt_credential_fails(issuer_key_module: Key, data: st.DataObject) -> None:
    token = issue_credential(unsigned_credential("did:example:subject", version=1), issuer_key_module,
                             proof_format="jwt", created="2024-01-01T00:00:00Z")
    h, p, s = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(h + "=="))
    claims = json.loads(base64.urlsafe_b64decode(p + "=="))
    target = data.draw(st.sampled_from(["header", "claims"]))
    doc = header if target == "header" else claims
    path = data.draw(st.sampled_from(_paths(doc)))
    tampered = _mutate(doc, path, data.draw(st.integers(0, 2)))
    if tampered == doc:
        return
    enc = base64.urlsafe_b64encode(json.dumps(tampered).encode()).rstrip(b"=").decode()
    forged = f"{enc}.{p}.{s}" if target == "header" else f"{h}.{enc}.{s}"
    assert not verify_credential(forged, now=NOW, trust=ANY).verified, (target, path)


@settings(max_examples=60, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=4),
                    max_leaves=12))
def test_verify_never_raises_on_garbage(garbage: Any) -> None:
    assert not verify_credential(garbage, now=NOW, trust=ANY).verified
