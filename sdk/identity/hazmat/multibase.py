"""base58btc, multibase ('z' prefix) and multicodec prefixes for keys, with length caps.

base58 decoding costs time quadratic in the input length, so every decoder here refuses input
longer than ``max_len`` characters *before* any arithmetic. The default cap fits a 64-byte
Ed25519 signature (88 characters); a multicodec Ed25519 key is 47 characters after the 'z'.
"""

from __future__ import annotations

_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
#: byte -> digit value, 0xff for a byte outside the alphabet (for ``bytes.translate``).
_VALUES = bytes(_ALPHABET.index(c) if c in _ALPHABET else 0xFF for c in range(256))
#: 0..58**2-1 -> its two base58 digits.
_PAIRS = [chr(a) + chr(b) for a in _ALPHABET for b in _ALPHABET]
_B58_POW10 = 58**10

# multicodec varint prefixes
ED25519_PUB = b"\xed\x01"
ED25519_PRIV = b"\x80\x26"
X25519_PUB = b"\xec\x01"
X25519_PRIV = b"\x82\x26"

#: Longest base58 text (characters, after the multibase prefix) decoded by default.
MAX_B58_CHARS = 128
#: Longest base58 text of a multicodec-prefixed 32-byte key: ceil(34 * log(256) / log(58)).
KEY_B58_CHARS = 47


def b58_length_bound(n_bytes: int) -> int:
    """The most base58 characters ``n_bytes`` bytes can encode to."""
    # log(256)/log(58) < 1.3658; leading zero bytes cost one character each, never more.
    return (n_bytes * 13658 + 9999) // 10000


def b58encode(data: bytes) -> str:
    """Bitcoin-alphabet base58 (leading zero bytes become '1')."""
    n = int.from_bytes(data, "big")
    pairs = _PAIRS
    parts: list[str] = []
    add = parts.append
    # Ten digits per division of the big number, then five two-digit table lookups on a small one.
    while n:
        n, r = divmod(n, _B58_POW10)
        r, a = divmod(r, 3364)
        r, b = divmod(r, 3364)
        r, c = divmod(r, 3364)
        e, d = divmod(r, 3364)
        add(pairs[a])
        add(pairs[b])
        add(pairs[c])
        add(pairs[d])
        add(pairs[e])
    parts.reverse()
    digits = "".join(parts).lstrip("1")  # the top chunk's zero digits
    pad = len(data) - len(data.lstrip(b"\0"))
    return "1" * pad + digits if pad else digits


def b58decode(text: str | bytes, *, max_len: int = MAX_B58_CHARS) -> bytes:
    """Inverse of :func:`b58encode`; ``ValueError`` on a bad character or text over ``max_len``."""
    if not isinstance(text, (str, bytes)):
        raise ValueError(f"base58 must be str or bytes, not {type(text).__name__}")
    if len(text) > max_len:
        raise ValueError(f"base58 text longer than {max_len} characters")
    try:
        raw = text.encode("ascii", "strict") if isinstance(text, str) else text
    except UnicodeEncodeError:
        raise ValueError("non-ASCII base58") from None
    values = raw.translate(_VALUES)
    if b"\xff" in values:
        bad = raw[values.index(b"\xff")]
        raise ValueError(f"invalid base58 character {chr(bad)!r}")
    head = len(values) % 4
    n = 0
    for v in values[:head]:
        n = n * 58 + v
    quads = iter(values[head:])
    for a, b, c, d in zip(quads, quads, quads, quads, strict=True):
        n = n * 11316496 + ((a * 58 + b) * 58 + c) * 58 + d  # 58**4
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(raw) - len(raw.lstrip(b"1"))
    return b"\0" * pad + body if pad else body


def is_canonical_b58(text: str, decoded: bytes) -> bool:
    """True if ``b58encode(decoded) == text`` for ``decoded = b58decode(text)``, without encoding.

    Base58 has one spelling per byte string: the leading '1's stand for the leading zero bytes
    and the rest is the number's digits, which start with a non-zero digit. So a decoded text is
    its own canonical encoding exactly when it has as many leading '1's as ``decoded`` has leading
    zero bytes.
    """
    ones = len(text) - len(text.lstrip("1"))
    zeros = len(decoded) - len(decoded.lstrip(b"\0"))
    return ones == zeros


def multibase_encode(data: bytes) -> str:
    """Multibase base58btc: 'z' + base58(data)."""
    return "z" + b58encode(data)


def multibase_decode(text: str, *, max_len: int = MAX_B58_CHARS) -> bytes:
    """Decode a base58btc multibase string (at most ``max_len`` characters after 'z')."""
    if not isinstance(text, str) or not text.startswith("z") or len(text) < 2:
        raise ValueError("expected a base58btc multibase string starting with 'z'")
    if len(text) - 1 > max_len:
        raise ValueError(f"multibase text longer than {max_len} characters")
    return b58decode(text[1:], max_len=max_len)


def encode_key(codec: bytes, key: bytes) -> str:
    """Multibase(multicodec prefix + raw key bytes)."""
    return multibase_encode(codec + key)


def decode_key(text: str, codec: bytes, length: int = 32) -> bytes:
    """Decode a multibase key, checking its length (before decoding), multicodec prefix and size."""
    raw = multibase_decode(text, max_len=b58_length_bound(len(codec) + length))
    if not raw.startswith(codec):
        raise ValueError(f"multicodec prefix {raw[:2].hex()} is not the expected {codec.hex()}")
    key = raw[len(codec):]
    if len(key) != length:
        raise ValueError(f"expected a {length}-byte key, got {len(key)} bytes")
    return key


__all__ = [
    "b58encode", "b58decode", "multibase_encode", "multibase_decode", "encode_key", "decode_key",
    "b58_length_bound", "is_canonical_b58", "ED25519_PUB", "ED25519_PRIV", "X25519_PUB", "X25519_PRIV",
    "MAX_B58_CHARS", "KEY_B58_CHARS",
]
