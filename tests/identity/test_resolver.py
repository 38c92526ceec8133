"""Resolvers: static table, did:key, did:web through a local fetcher, the caching chain."""

from __future__ import annotations

import pytest

from sdk.identity import (
    DidWebResolver,
    Key,
    ResolutionError,
    ResolverChain,
    StaticResolver,
    TrustPolicy,
    issue_credential,
    verify_credential,
)
from sdk.identity.resolver import did_web_url
from tests.fixtures.identity import NOW, unsigned_credential

ANY = TrustPolicy.ANY

DID = "did:web:example.com:devices"


def _did_web_doc(key: Key, *, auth_only: bool = False) -> dict:
    vm = f"{DID}#key-1"
    doc = {
        "@context": ["https://www.w3.org/ns/did/v1"],
        "id": DID,
        "verificationMethod": [{"id": "#key-1", "type": "Multikey", "controller": DID,
                                "publicKeyMultibase": key.public_key_multibase},
                               {"id": f"{DID}#jwk", "type": "JsonWebKey2020", "controller": DID,
                                "publicKeyJwk": key.to_jwk()}],
        "authentication": ["#key-1"],
    }
    if not auth_only:
        doc["assertionMethod"] = [vm, "#jwk"]
    return doc


def test_did_web_url() -> None:
    assert did_web_url("did:web:example.com") == "https://example.com/.well-known/did.json"
    assert did_web_url("did:web:example.com%3A8443:user:alice") == "https://example.com:8443/user/alice/did.json"
    for bad in ("did:web:", "did:key:z6Mk", "did:web:a::b"):
        with pytest.raises(ResolutionError):
            did_web_url(bad)


def test_did_web_resolution_and_purposes(issuer_key: Key) -> None:
    fetched: list[str] = []

    def fetch(url: str) -> dict:
        fetched.append(url)
        return _did_web_doc(issuer_key)

    resolver = DidWebResolver(fetch)
    key1 = resolver.resolve(f"{DID}#key-1")
    assert key1.public_key == issuer_key.public and key1.controller == DID
    assert key1.purposes == {"authentication", "assertionMethod"}
    assert resolver.resolve(f"{DID}#jwk").purposes == {"assertionMethod"}
    assert fetched[0] == "https://example.com/devices/did.json"
    with pytest.raises(ResolutionError):
        resolver.resolve(f"{DID}#missing")


def test_did_web_credential_end_to_end(issuer_key: Key, holder_key: Key) -> None:
    docs = {"https://example.com/devices/did.json": _did_web_doc(issuer_key)}
    chain = ResolverChain({"web": DidWebResolver(docs.__getitem__)})
    cred = issue_credential(unsigned_credential(holder_key.did, issuer=DID), issuer_key,
                            verification_method=f"{DID}#key-1")
    assert verify_credential(cred, resolver=chain, now=NOW, trust=ANY).verified
    # a key listed only under authentication may not issue credentials
    auth_only = ResolverChain({"web": DidWebResolver(lambda url: _did_web_doc(issuer_key, auth_only=True))})
    assert verify_credential(cred, resolver=auth_only, now=NOW, trust=ANY).errors == ["key_not_authorized"]
    # fetch failures and wrong documents are "unresolvable"
    offline = ResolverChain({"web": DidWebResolver(lambda url: (_ for _ in ()).throw(OSError("offline")))})
    assert verify_credential(cred, resolver=offline, now=NOW, trust=ANY).errors == ["unresolvable"]
    wrong_id = ResolverChain({"web": DidWebResolver(lambda url: {**_did_web_doc(issuer_key), "id": "did:web:x"})})
    assert verify_credential(cred, resolver=wrong_id, now=NOW, trust=ANY).errors == ["unresolvable"]


def test_chain_caches_and_falls_back(issuer_key: Key) -> None:
    calls = []

    def fetch(url: str) -> dict:
        calls.append(url)
        return _did_web_doc(issuer_key)

    static = StaticResolver({"https://issuer.example#k": issuer_key.public_key_multibase})
    chain = ResolverChain({"web": DidWebResolver(fetch)}, fallbacks=[static])
    for _ in range(3):
        chain.resolve(f"{DID}#key-1")
    assert len(calls) == 1
    chain.clear()
    chain.resolve(f"{DID}#key-1")
    assert len(calls) == 2
    assert chain.resolve("https://issuer.example#k").controller == "https://issuer.example"
    assert chain.resolve(issuer_key.verification_method).controller == issuer_key.did
    with pytest.raises(ResolutionError):
        chain.resolve("did:example:unknown#1")


def test_static_resolver(issuer_key: Key) -> None:
    r = StaticResolver({"https://a.example/k#1": issuer_key.public_key_multibase},
                       controllers={"https://a.example/k#1": "https://a.example"})
    assert r.resolve("https://a.example/k#1").controller == "https://a.example"
    assert r.resolve(issuer_key.verification_method).public_key == issuer_key.public  # did:key built in
    with pytest.raises(ResolutionError):
        r.resolve("https://b.example#1")
    with pytest.raises(ResolutionError):
        r.resolve(issuer_key.did)  # a did:key VM id needs its fragment
    with pytest.raises(Exception):
        StaticResolver({"x#1": "not-multibase"})
