"""The authorization hook: credential checks, grant caching, expiry and revocation (no broker)."""

from __future__ import annotations

import time

import pytest

from sdk.identity import (
    V2_CONTEXT,
    Key,
    StatusChecker,
    StatusList,
    TrustPolicy,
    create_status_list_credential,
    issue_credential,
    status_entry,
)
from sdk.messaging import Authorizer, CredentialRequirement, Message, NotAuthorized

URL = "https://issuer.example/status/1"


def _vc(issuer: Key, subject: str, *, types=("InferenceAccessCredential",), **extra) -> dict:
    cred = {"@context": [V2_CONTEXT], "type": ["VerifiableCredential", *types], "credentialSubject": {"id": subject}}
    cred.update(extra.pop("fields", {}))
    return issue_credential(cred, issuer, **extra)


def _msg(sender: Key, *creds) -> Message:
    return Message(topic="t", sender=sender.did, kid=sender.verification_method, type="request", id="i",
                   body=None, issued_at=time.time(), credentials=tuple(creds))


@pytest.fixture(scope="module")
def issuer() -> Key:
    return Key.generate()


def _req(issuer: Key, **kw) -> CredentialRequirement:
    return CredentialRequirement(type="InferenceAccessCredential",
                                 trust=TrustPolicy({issuer.did: {"InferenceAccessCredential"}}), **kw)


def test_grant_is_cached_until_recheck(issuer: Key) -> None:
    alice = Key.generate()
    req, authz = _req(issuer, recheck_interval=60), Authorizer()
    now = time.time()
    assert authz.authorize(_msg(alice, _vc(issuer, alice.did)), req, now=now).verified
    assert authz.authorize(_msg(alice), req, now=now + 30).verified  # cached: no credential needed
    with pytest.raises(NotAuthorized):
        authz.authorize(_msg(alice), req, now=now + 61)
    authz.authorize(_msg(alice, _vc(issuer, alice.did)), req, now=now + 62)
    authz.invalidate(alice.did)
    with pytest.raises(NotAuthorized):
        authz.authorize(_msg(alice), req, now=now + 63)


def test_grant_ends_at_credential_expiry(issuer: Key) -> None:
    alice = Key.generate()
    until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 20))
    vc = _vc(issuer, alice.did, fields={"validUntil": until})
    req, authz = _req(issuer, recheck_interval=3600), Authorizer()
    authz.authorize(_msg(alice, vc), req)
    with pytest.raises(NotAuthorized):
        authz.authorize(_msg(alice), req, now=time.time() + 40)


def test_wrong_type_untrusted_and_foreign_subject(issuer: Key) -> None:
    alice, bob = Key.generate(), Key.generate()
    req = _req(issuer)
    cases = [
        _msg(alice, _vc(issuer, alice.did, types=("DeviceCredential",))),
        _msg(alice, _vc(Key.generate(), alice.did)),
        _msg(bob, _vc(issuer, alice.did)),
        _msg(alice, {"not": "a credential"}, "not.a.jwt"),
        _msg(alice),
    ]
    for m in cases:
        with pytest.raises(NotAuthorized) as err:
            Authorizer().authorize(m, req)
        assert err.value.reason == "not_authorized"


def test_revocation_via_status_list(issuer: Key) -> None:
    alice = Key.generate()
    lst = StatusList()
    lists = {URL: create_status_list_credential(issuer, URL, status_list=lst)}
    vc = _vc(issuer, alice.did, credential_status=status_entry(URL, 7))
    checker = StatusChecker(lists.get)
    req, authz = _req(issuer, verify_options={"status": checker}), Authorizer()
    authz.authorize(_msg(alice, vc), req)
    lst.set(7)  # the issuer revokes and publishes a new list (e.g. a retained MQTT message)
    checker.update(URL, create_status_list_credential(issuer, URL, status_list=lst))
    authz.authorize(_msg(alice, vc), req)  # grant still cached
    authz.status_changed(URL)
    with pytest.raises(NotAuthorized) as err:
        authz.authorize(_msg(alice, vc), req)
    assert "revoked" in str(err.value)
    assert err.value.reason == "revoked"  # said as such: the peer learns it was revoked
