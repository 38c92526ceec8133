"""TrustPolicy: issuer → allowed credential types."""

from __future__ import annotations

import pytest

from sdk.identity import TrustPolicy


def test_allows_only_listed_types() -> None:
    policy = TrustPolicy({"did:key:zA": {"DeviceCredential", "InferenceAccessCredential"}})
    assert policy.allows("did:key:zA", ["VerifiableCredential", "DeviceCredential"])
    assert policy.allows("did:key:zA", ["VerifiableCredential", "DeviceCredential", "InferenceAccessCredential"])
    assert not policy.allows("did:key:zA", ["VerifiableCredential", "AdminCredential"])
    assert not policy.allows("did:key:zB", ["VerifiableCredential", "DeviceCredential"])
    assert not policy.allows(None, ["VerifiableCredential"])


def test_from_config_and_wildcard() -> None:
    policy = TrustPolicy.from_config({"trusted_issuers": [
        {"issuer": "did:key:zA", "types": ["DeviceCredential"]},
        {"issuer": "did:key:zA", "types": "InferenceAccessCredential"},
        {"issuer": "did:key:zRoot"},
    ]})
    assert policy.allows("did:key:zA", ["VerifiableCredential", "InferenceAccessCredential"])
    assert policy.allows("did:key:zRoot", ["VerifiableCredential", "Anything"])
    assert TrustPolicy.from_config(policy.to_config()) == policy
    extended = policy.allow("did:key:zB", "DeviceCredential")
    assert extended.allows("did:key:zB", ["DeviceCredential"]) and not policy.allows("did:key:zB", ["DeviceCredential"])
    with pytest.raises(ValueError):
        TrustPolicy.from_config([{"types": ["X"]}])
    with pytest.raises(ValueError):
        TrustPolicy({"": ["X"]})
