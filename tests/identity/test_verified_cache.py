"""The Ed25519 verified-triples cache: digests of what verified, never of what failed."""

from __future__ import annotations

import nacl.signing

from sdk.identity.hazmat import ed25519


def test_verified_triples_are_remembered_as_digests_and_failures_are_not() -> None:
    ed25519.clear_cache()
    sk = nacl.signing.SigningKey.generate()
    pk = bytes(sk.verify_key)
    msg = b"m" * 64
    sig = sk.sign(msg).signature
    assert ed25519.verify_detached(pk, sig, msg)
    assert len(ed25519._verified) == 1
    (entry,) = ed25519._verified
    assert isinstance(entry, bytes) and len(entry) == 32          # a digest, not the triple
    assert ed25519.verify_detached(pk, sig, msg)                 # a hit
    assert len(ed25519._verified) == 1
    # the same key and signature over another message, or a flipped bit: refused and not remembered
    assert not ed25519.verify_detached(pk, sig, msg[:-1] + b"n")
    bad = bytes([sig[0] ^ 1]) + sig[1:]
    assert not ed25519.verify_detached(pk, bad, msg)
    assert len(ed25519._verified) == 1
    # boundaries moved between key, signature and message give other digests (fixed lengths)
    assert not ed25519.verify_detached(pk, sig[:-1], sig[-1:] + msg)
    assert not ed25519.verify_detached(pk, sig, "text")  # type: ignore[arg-type]
    ed25519.clear_cache()
    assert not ed25519._verified
