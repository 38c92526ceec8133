"""Strict base64url without padding (RFC 7515 §2): canonical encodings only.

Decoding rejects padding, characters outside the URL-safe alphabet, impossible lengths and
non-zero trailing bits, so each byte string has exactly one accepted wire form.
"""

from __future__ import annotations

import base64
import binascii

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_TO_STD = bytes.maketrans(b"-_", b"+/")
_PAD = (b"", b"", b"==", b"=")  # by length mod 4 (1 is refused before)
# The last character of a 2- or 3-byte remainder may only use the bits that carry data.
_TAIL2 = frozenset(b"AQgw")  # 4 unused low bits (1 byte in the last group)
_TAIL3 = frozenset(b"AEIMQUYcgkosw048")  # 2 unused low bits (2 bytes in the last group)


def b64url_encode(data: bytes) -> bytes:
    """base64url of ``data`` without padding."""
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def b64url_decode(data: bytes | str, *, max_len: int | None = None) -> bytes:
    """Decode canonical unpadded base64url; ``ValueError`` on anything else.

    ``max_len`` bounds the encoded length before any work is done.
    """
    if isinstance(data, str):
        try:
            data = data.encode("ascii", "strict")
        except UnicodeEncodeError as exc:
            raise ValueError("non-ASCII base64url") from exc
    elif not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"base64url must be str or bytes, not {type(data).__name__}")
    data = bytes(data)
    if max_len is not None and len(data) > max_len:
        raise ValueError(f"base64url longer than {max_len} characters")
    rem = len(data) % 4
    if rem == 1:
        raise ValueError("bad base64url length")
    if data.translate(None, _ALPHABET):  # anything left is outside the alphabet (or padding)
        raise ValueError("character outside the base64url alphabet (or padding)")
    if (rem == 2 and data[-1] not in _TAIL2) or (rem == 3 and data[-1] not in _TAIL3):
        raise ValueError("non-canonical base64url (trailing bits set)")
    return binascii.a2b_base64(data.translate(_TO_STD) + _PAD[rem])


__all__ = ["b64url_encode", "b64url_decode"]
