"""Ed25519 primitives for the hot path: verification with a bounded cache of verified triples,
and the small-order point check.

Ed25519 verification is a pure function of (public key, signature, message), so remembering
triples that verified is safe; failures are never cached. A triple is remembered as the 32-byte
BLAKE2b digest of ``key || signature || message`` (both fixed-length, so the split is unambiguous;
a false hit needs a 256-bit collision), not the three byte strings.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import nacl.bindings
import nacl.exceptions

#: verified triples remembered: the hot ones (a coordinator's credential, a status list, each checked
#: by many); a fleet's own credentials are each checked about once, so a bigger bound only holds memory
_MAX = 1024
_verified: OrderedDict[bytes, None] = OrderedDict()
_lock = threading.Lock()


# The eight points of order dividing 8 (and the non-canonical encodings y = p, p + 1), compared with
# the x sign bit cleared, as libsodium's ``has_small_order`` does.
_SMALL_ORDER = frozenset(bytes.fromhex(h) for h in (
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0100000000000000000000000000000000000000000000000000000000000000",  # order 1 (neutral)
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2 (y = p - 1)
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p, i.e. 0 (order 4)
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # y = p + 1, i.e. 1
))


def is_small_order(public_key: bytes) -> bool:
    """True for an encoding of a point of order 1, 2, 4 or 8 (all-zero included): never a real key."""
    if len(public_key) != 32:
        return False
    return bytes(public_key[:31]) + bytes((public_key[31] & 0x7F,)) in _SMALL_ORDER


def verify_detached(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True if ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    if len(signature) != 64 or len(public_key) != 32:
        return False
    try:
        triple = hashlib.blake2b(public_key + signature + message, digest_size=32).digest()
    except TypeError:
        return False
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


__all__ = ["verify_detached", "clear_cache", "is_small_order"]
