"""did:key decoding keeps the input's identifiers (no base58 re-encode) and refuses what it refused."""

from __future__ import annotations

import pytest

from sdk.identity import Key, PublicKey, ResolutionError, public_key_from_did_key
from sdk.identity.hazmat.multibase import ED25519_PUB, X25519_PUB, b58decode, b58encode, encode_key
from sdk.identity.resolver import DidKeyResolver, ResolverChain


def _fresh(pub: PublicKey) -> PublicKey:
    """The same key with nothing cached: its identifiers are computed by encoding."""
    return PublicKey(bytes(pub.raw))


def test_decoded_key_carries_the_input_identifiers() -> None:
    key = Key.generate()
    for text in (key.did, key.verification_method, key.did + "#"):
        pub = public_key_from_did_key(text)
        # set from the input, before any read: a read encodes nothing
        assert {"did", "multibase", "verification_method"} <= pub.__dict__.keys()
        assert pub == key.public
        fresh = _fresh(pub)
        assert (pub.did, pub.multibase, pub.verification_method) == (fresh.did, fresh.multibase,
                                                                     fresh.verification_method)


def test_cache_miss_and_hit_carry_exact_identifiers(did_key_cache) -> None:
    keys = [Key.generate() for _ in range(3)]
    resolver = DidKeyResolver()
    for round_ in ("miss", "hit"):
        for key in keys:
            resolved = resolver.resolve(key.verification_method)
            assert resolved.controller == key.did and resolved.id == key.verification_method
            if round_ == "miss":  # the decoded key: identifiers set from the input
                assert "did" in resolved.public_key.__dict__
            assert resolved.public_key.did == _fresh(resolved.public_key).did == key.did
            assert resolved.public_key.verification_method == key.verification_method
    assert len(did_key_cache._did_keys) == 3


def _ident(key: Key) -> str:
    return key.did.removeprefix("did:key:")


def _non_canonical(key: Key) -> dict[str, str]:
    ident = _ident(key)
    raw = b58decode(ident[1:])
    return {
        "extra leading 1": "did:key:z1" + ident[1:],
        "two leading 1s": "did:key:z11" + ident[1:],
        "x25519 prefix": "did:key:" + encode_key(X25519_PUB, key.x25519_public),
        "33-byte key": "did:key:z" + b58encode(raw[:-1]),
        "35-byte key": "did:key:z" + b58encode(raw + b"\0"),
        "leading zero byte": "did:key:z" + b58encode(b"\0" + raw),
        "no multibase z": "did:key:" + ident[1:],
        "invalid character": "did:key:z" + ident[1:-1] + "0",
        "empty": "did:key:",
        "just z": "did:key:z",
    }


@pytest.mark.parametrize("case", list(_non_canonical(Key.from_seed(b"\x07" * 32))))
def test_non_canonical_forms_are_refused_and_not_cached(case: str, did_key_cache) -> None:
    did = _non_canonical(Key.from_seed(b"\x07" * 32))[case]
    with pytest.raises(ResolutionError):
        public_key_from_did_key(did)
    ident = did.removeprefix("did:key:")
    with pytest.raises(ResolutionError):
        DidKeyResolver().resolve(f"{did}#{ident}")
    with pytest.raises(ResolutionError):
        ResolverChain().resolve(f"{did}#{ident}")
    assert len(did_key_cache._did_keys) == 0


def test_mixed_up_characters_give_another_key_named_by_the_input(did_key_cache) -> None:
    """Swapped base58 characters are a different (canonical) did:key, or refused: never the original."""
    key = Key.generate()
    ident = _ident(key)
    outcomes = 0
    for i in range(2, len(ident) - 1):
        if ident[i] == ident[i + 1]:
            continue
        swapped = ident[:i] + ident[i + 1] + ident[i] + ident[i + 2:]
        did = "did:key:" + swapped
        try:
            resolved = DidKeyResolver().resolve(f"{did}#{swapped}")
        except ResolutionError:
            outcomes += 1
            continue
        assert resolved.public_key != key.public
        assert resolved.controller == did == _fresh(resolved.public_key).did
        assert b58decode(swapped[1:]).startswith(ED25519_PUB)
        outcomes += 1
    assert outcomes > 0


def test_foreign_fragment_still_refused(did_key_cache) -> None:
    a, b = Key.generate(), Key.generate()
    with pytest.raises(ResolutionError):
        public_key_from_did_key(f"{a.did}#{_ident(b)}")
    with pytest.raises(ResolutionError):
        DidKeyResolver().resolve(f"{a.did}#{_ident(b)}")
    assert len(did_key_cache._did_keys) == 0
