"""base58btc, multibase ('z' prefix) and multicodec prefixes for keys, with length caps.

base58 decoding costs time quadratic in the input length, so every decoder here refuses input
longer than ``max_len`` characters *before* any arithmetic. The default cap fits a 64-byte
Ed25519 signature (88 characters); a multicodec Ed25519 key is 47 characters after the 'z'.
"""

from __future__ import annotations

_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}

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
    out = bytearray()
    while n:
        n, r = divmod(n, 58)
        out.append(_ALPHABET[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return (b"1" * pad + bytes(reversed(out))).decode("ascii")


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
    n = 0
    for c in raw:
        try:
            n = n * 58 + _INDEX[c]
        except KeyError:
            raise ValueError(f"invalid base58 character {chr(c)!r}") from None
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    pad = len(raw) - len(raw.lstrip(b"1"))
    return b"\0" * pad + body


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
    "b58_length_bound", "ED25519_PUB", "ED25519_PRIV", "X25519_PUB", "X25519_PRIV",
    "MAX_B58_CHARS", "KEY_B58_CHARS",
]
