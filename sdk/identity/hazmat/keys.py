"""Raw key material of a :class:`~sdk.identity.Key`: for protocol code that needs the bytes.

Nothing here is needed to sign, verify, issue or present; those go through ``sdk.identity``.
"""

from __future__ import annotations

import nacl.bindings

from sdk.identity.keys import Key


def _check(key: object) -> Key:
    if not isinstance(key, Key):
        raise TypeError("key must be a sdk.identity.Key")
    return key


def raw_private_bytes(key: Key) -> bytes:
    """The 32-byte Ed25519 seed (the RFC 8032 private key)."""
    return bytes(_check(key)._signing)  # noqa: SLF001 - this module is the one sanctioned reader


def signing_key_bytes(key: Key) -> bytes:
    """The 64-byte libsodium secret key (seed || public key), as ``crypto_sign`` takes it."""
    return bytes(_check(key)._signing._signing_key)  # noqa: SLF001


def x25519_private(key: Key) -> bytes:
    """The X25519 private key derived from the Ed25519 key (for key agreement)."""
    cached = key.__dict__.get("_x25519_private") if isinstance(key, Key) else None
    if cached is None:
        cached = nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(signing_key_bytes(key))
        key.__dict__["_x25519_private"] = cached
    return cached


__all__ = ["raw_private_bytes", "signing_key_bytes", "x25519_private"]
