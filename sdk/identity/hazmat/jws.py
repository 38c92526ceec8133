"""Compact JWS (RFC 7515 §7.1) framing: split and join, strictly, before and after any crypto.

Signing and verification stay with their callers (the envelope's cached fast path, VC-JWT,
CONNECT proofs), which differ in keys, header rules and error types; what they share is the
framing: three canonical base64url parts, a JSON-object header, and bounded sizes, checked
before any work. Errors are ``ValueError``; callers map them to their own typed errors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sdk.identity.hazmat import json as strict_json
from sdk.identity.hazmat.b64 import b64url_decode, b64url_encode

ED25519_SIG_CHARS = 86  # 64 bytes, unpadded base64url


@dataclass(frozen=True, slots=True)
class CompactJWS:
    """A split compact JWS: the decoded header, the raw payload, the signature and its input."""

    header: dict[str, Any]
    payload: bytes
    signature: bytes
    signing_input: bytes  # ASCII ``header_b64 "." payload_b64``, exactly as received


def split_compact(
    token: str | bytes, *, max_len: int, max_header: int = 2048, max_signature: int = ED25519_SIG_CHARS
) -> CompactJWS:
    """Split and strictly decode ``token``; ``ValueError`` on any framing problem.

    Checks, cheapest first: total length, three parts, part lengths, canonical base64url,
    a strict-JSON object header. The payload is returned undecoded (its parse is the caller's).
    """
    if isinstance(token, str):
        if not token.isascii():
            raise ValueError("compact JWS must be ASCII")
        token = token.encode("ascii")
    if not isinstance(token, (bytes, bytearray)):
        raise ValueError(f"compact JWS must be str or bytes, not {type(token).__name__}")
    if len(token) > max_len:
        raise ValueError(f"compact JWS over {max_len} characters")
    parts = bytes(token).split(b".")
    if len(parts) != 3:
        raise ValueError("not a compact JWS (need 3 dot-separated parts)")
    head, body, sig = parts
    header = strict_json.loads(b64url_decode(head, max_len=max_header), max_bytes=max_header, max_depth=8)
    if not isinstance(header, dict):
        raise ValueError("JWS header is not a JSON object")
    return CompactJWS(header, b64url_decode(body), b64url_decode(sig, max_len=max_signature),
                      head + b"." + body)


def join_compact(header: Mapping[str, Any], payload: bytes, sign: Callable[[bytes], bytes]) -> str:
    """``base64url(header) "." base64url(payload) "." base64url(sign(signing input))``."""
    signing_input = b64url_encode(strict_json.dumps_compact(dict(header)).encode("utf-8")) + b"." + \
        b64url_encode(payload)
    return (signing_input + b"." + b64url_encode(sign(signing_input))).decode("ascii")


__all__ = ["CompactJWS", "split_compact", "join_compact", "ED25519_SIG_CHARS"]
