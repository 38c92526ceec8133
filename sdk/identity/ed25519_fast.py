"""Low level: Ed25519 verification for the hot path, with a bounded cache of verified triples.

Ed25519 verification is a pure function of (public key, signature, message), so remembering
triples that verified is safe; failures are never cached.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import nacl.bindings
import nacl.exceptions

_MAX = 8192
_verified: OrderedDict[tuple[bytes, bytes, bytes], None] = OrderedDict()
_lock = threading.Lock()


def verify_detached(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    if len(signature) != 64 or len(public_key) != 32:
        return False
    triple = (public_key, signature, message)
    if triple in _verified:
        return True
    try:
        nacl.bindings.crypto_sign_open(signature + message, public_key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError, TypeError):
        return False
    with _lock:
        _verified[triple] = None
        if len(_verified) > _MAX:
            _verified.popitem(last=False)
    return True


def clear_cache() -> None:
    """Forget every remembered verification (benchmarks use this for cold figures)."""
    with _lock:
        _verified.clear()


__all__ = ["verify_detached", "clear_cache"]
