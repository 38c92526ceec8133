"""Resolvers: static table, did:key, did:web through a local fetcher, the caching chain."""

from __future__ import annotations

import pytest

from sdk.identity import (
    DidWebResolver,
    InvalidKey,
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
    with pytest.raises(InvalidKey):
        StaticResolver({"x#1": "not-multibase"})


def test_did_key_cache_is_bounded_lru_and_reservable(did_key_cache, monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[str] = []
    real = did_key_cache.public_key_from_did_key

    def counting(vm: str):
        decoded.append(vm)
        return real(vm)

    monkeypatch.setattr(did_key_cache, "public_key_from_did_key", counting)
    keys = [Key.from_seed(bytes([i + 1]) * 32) for i in range(4)]
    did_key_cache.resize_did_key_cache(3)
    chain = ResolverChain()
    for k in keys[:3]:
        assert chain.resolve(k.verification_method).public_key == k.public
    chain.resolve(keys[0].verification_method)              # a hit: 0 becomes the most recent
    assert len(decoded) == 3
    r = chain.resolve(keys[3].verification_method)          # evicts 1, the least recently used
    assert (r.controller, r.id, r.public_key) == (keys[3].did, keys[3].verification_method, keys[3].public)
    assert len(did_key_cache._did_keys) == 3
    for k in (keys[0], keys[2], keys[3]):
        hit = chain.resolve(k.verification_method)
        assert hit.controller == k.did and hit.public_key == k.public
    assert len(decoded) == 4
    chain.resolve(keys[1].verification_method)
    assert decoded[-1] == keys[1].verification_method and len(decoded) == 5
    assert did_key_cache.reserve_did_key_cache(2) == 3      # never shrinks
    assert did_key_cache.reserve_did_key_cache(11_000) == 11_000
    with pytest.raises(ResolutionError):
        chain.resolve(keys[0].did)                          # still needs its fragment
    with pytest.raises(ResolutionError):
        chain.resolve(f"{keys[0].did}#{keys[1].did.removeprefix('did:key:')}")   # foreign fragment


def test_chain_cache_is_lru_with_a_configurable_bound(issuer_key: Key) -> None:
    calls: list[str] = []

    def fetch(url: str) -> dict:
        calls.append(url)
        host = url.removeprefix("https://").split("/", 1)[0]
        doc = _did_web_doc(issuer_key)
        did = f"did:web:{host}"
        return {**doc, "id": did, "verificationMethod": [{**doc["verificationMethod"][0], "controller": did}]}

    chain = ResolverChain({"web": DidWebResolver(fetch)}, max_size=2)
    a, b, c = (f"did:web:{h}.example#key-1" for h in "abc")
    chain.resolve(a)
    chain.resolve(b)
    chain.resolve(a)                     # a is now the most recent
    chain.resolve(c)                     # evicts b
    assert len(calls) == 3
    chain.resolve(a)
    assert len(calls) == 3
    chain.resolve(b)
    assert len(calls) == 4
    chain.resize(1)
    assert chain.max_size == 1
    chain.resolve(b)
    assert len(calls) == 4
    with pytest.raises(ValueError):
        ResolverChain(max_size=0)
