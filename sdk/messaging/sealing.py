"""End-to-end body encryption between two did:key holders (authenticated, static-static X25519).

Scheme ``X25519-XC20P`` (see docs/PROTOCOL.md): shared key = libsodium ``crypto_box_beforenm``
(HSalsa20 over the X25519 shared secret of the sender's and recipient's keys derived from their
Ed25519 did:keys); body encrypted with XChaCha20-Poly1305-IETF, fresh random 24-byte nonce,
associated data = the envelope id. The envelope signature also covers the ciphertext.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import nacl.bindings as _nb
import nacl.exceptions

from sdk.identity import Key, PublicKey
from sdk.identity.hazmat.keys import x25519_private
from sdk.messaging.errors import DecryptFailed

ALG = "X25519-XC20P"
NONCE_BYTES = 24


class SharedKeys:
    """LRU cache of shared keys between one own :class:`Key` and peers' public keys."""

    def __init__(self, key: Key, *, max_entries: int = 4096) -> None:
        self._x_priv = x25519_private(key)
        self._max = max_entries
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()

    def get(self, peer: PublicKey) -> bytes:
        raw = peer.raw
        k = self._cache.get(raw)
        if k is None:
            k = _nb.crypto_box_beforenm(peer.x25519, self._x_priv)
            self._cache[raw] = k
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return k


def encrypt(shared_key: bytes, plaintext: bytes, aad: bytes, *, nonce: bytes | None = None) -> tuple[bytes, bytes]:
    """``(nonce, ciphertext_with_tag)`` for ``plaintext``; ``nonce`` is random unless given (tests)."""
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    return nonce, _nb.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, nonce, shared_key)


def decrypt(shared_key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """The plaintext, or raise :class:`DecryptFailed`."""
    if len(nonce) != NONCE_BYTES:
        raise DecryptFailed("bad nonce length")
    try:
        return _nb.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, aad, nonce, shared_key)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise DecryptFailed("ciphertext does not authenticate") from exc


__all__ = ["ALG", "SharedKeys", "encrypt", "decrypt"]
