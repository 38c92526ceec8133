"""Low level: base58btc, multibase ('z' prefix) and multicodec prefixes for keys."""

from __future__ import annotations

_ALPHABET = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}

# multicodec varint prefixes
ED25519_PUB = b"\xed\x01"
ED25519_PRIV = b"\x80\x26"
X25519_PUB = b"\xec\x01"
X25519_PRIV = b"\x82\x26"


def b58encode(data: bytes) -> str:
    """Bitcoin-alphabet base58 (leading zero bytes become '1')."""
    n = int.from_bytes(data, "big")
    out = bytearray()
    while n:
        n, r = divmod(n, 58)
        out.append(_ALPHABET[r])
    pad = len(data) - len(data.lstrip(b"\0"))
    return (b"1" * pad + bytes(reversed(out))).decode("ascii")


def b58decode(text: str) -> bytes:
    """Inverse of :func:`b58encode`; ``ValueError`` on a character outside the alphabet."""
    raw = text.encode("ascii", "strict") if isinstance(text, str) else text
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


def multibase_decode(text: str) -> bytes:
    """Decode a base58btc multibase string; ``ValueError`` for any other base."""
    if not isinstance(text, str) or not text.startswith("z") or len(text) < 2:
        raise ValueError("expected a base58btc multibase string starting with 'z'")
    return b58decode(text[1:])


def encode_key(codec: bytes, key: bytes) -> str:
    """Multibase(multicodec prefix + raw key bytes)."""
    return multibase_encode(codec + key)


def decode_key(text: str, codec: bytes, length: int = 32) -> bytes:
    """Decode a multibase key, checking its multicodec prefix and length."""
    raw = multibase_decode(text)
    if not raw.startswith(codec):
        raise ValueError(f"multicodec prefix {raw[:2].hex()} is not the expected {codec.hex()}")
    key = raw[len(codec):]
    if len(key) != length:
        raise ValueError(f"expected a {length}-byte key, got {len(key)} bytes")
    return key
