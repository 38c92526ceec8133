"""Ed25519 keys (pynacl), their did:key identifiers and derived X25519 agreement keys.

``Key`` holds a private key; ``PublicKey`` the public half (what a resolver returns). Raw
private key bytes are only available through :mod:`sdk.identity.hazmat.keys`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.signing

from sdk.identity.errors import InvalidKey, InvalidSignature
from sdk.identity.hazmat.b64 import b64url_decode, b64url_encode
from sdk.identity.hazmat.ed25519 import is_small_order
from sdk.identity.hazmat.multibase import (
    ED25519_PRIV,
    ED25519_PUB,
    X25519_PUB,
    decode_key,
    encode_key,
)

_KEY_B64_CHARS = 43  # 32 bytes of unpadded base64url


def _b64u(data: bytes) -> str:
    return b64url_encode(data).decode("ascii")


def _unb64u(text: object) -> bytes:
    if not isinstance(text, str):
        raise ValueError("a JWK member is a base64url string")
    return b64url_decode(text, max_len=_KEY_B64_CHARS)


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key (32 raw bytes; all-zero and other small-order points are refused)."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, (bytes, bytearray)) or len(self.raw) != 32:
            raise InvalidKey("an Ed25519 public key is 32 bytes")
        if is_small_order(self.raw):
            raise InvalidKey("an Ed25519 public key must not be a small-order point")

    @classmethod
    def from_multibase(cls, text: str) -> PublicKey:
        """Parse ``z6Mk...`` (multicodec ed25519-pub 0xed01)."""
        try:
            return cls(decode_key(text, ED25519_PUB))
        except ValueError as exc:
            raise InvalidKey(f"bad Ed25519 public key multibase: {exc}") from exc

    @classmethod
    def from_jwk(cls, jwk: dict[str, Any]) -> PublicKey:
        """Parse an OKP/Ed25519 JWK (public part only is read)."""
        if not isinstance(jwk, dict) or jwk.get("kty") != "OKP" or jwk.get("crv") != "Ed25519":
            raise InvalidKey("expected a JWK with kty=OKP and crv=Ed25519")
        try:
            return cls(_unb64u(jwk["x"]))
        except (KeyError, ValueError, TypeError) as exc:
            raise InvalidKey(f"bad JWK 'x': {exc}") from exc

    @cached_property
    def multibase(self) -> str:
        return encode_key(ED25519_PUB, self.raw)

    @cached_property
    def did(self) -> str:
        """The did:key DID for this key."""
        return "did:key:" + self.multibase

    @cached_property
    def verification_method(self) -> str:
        """The did:key verification method id (``did:key:z..#z..``)."""
        return f"{self.did}#{self.multibase}"

    @cached_property
    def _verify_key(self) -> nacl.signing.VerifyKey:
        return nacl.signing.VerifyKey(bytes(self.raw))

    def verify(self, signature: bytes, data: bytes) -> None:
        """Return if ``signature`` is valid over ``data``, else raise :class:`InvalidSignature`."""
        try:
            self._verify_key.verify(data, signature)
        except (nacl.exceptions.BadSignatureError, ValueError, TypeError) as exc:
            raise InvalidSignature("Ed25519 signature does not verify") from exc

    def is_valid(self, signature: bytes, data: bytes) -> bool:
        """Like :meth:`verify` but returns a bool."""
        try:
            self.verify(signature, data)
        except InvalidSignature:
            return False
        return True

    @cached_property
    def x25519(self) -> bytes:
        """The X25519 public key derived from this Ed25519 key (for key agreement)."""
        try:
            return nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(bytes(self.raw))
        except Exception as exc:
            raise InvalidKey("Ed25519 key cannot be converted to X25519") from exc

    @cached_property
    def x25519_multibase(self) -> str:
        return encode_key(X25519_PUB, self.x25519)

    def to_jwk(self) -> dict[str, str]:
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64u(self.raw)}


class Key:
    """An Ed25519 signing key with its did:key identity.

    Build with :meth:`generate`, :meth:`from_seed`, :meth:`from_multibase` or :meth:`from_jwk`.
    """

    __slots__ = ("__dict__", "_signing", "public")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        if not isinstance(signing_key, nacl.signing.SigningKey):
            raise TypeError("use Key.generate(), Key.from_seed() or Key.from_multibase()")
        self._signing = signing_key
        self.public = PublicKey(bytes(signing_key.verify_key))

    @classmethod
    def generate(cls) -> Key:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Key:
        """From the 32-byte Ed25519 seed (the RFC 8032 private key)."""
        if not isinstance(seed, (bytes, bytearray)) or len(seed) != 32:
            raise InvalidKey("an Ed25519 seed is 32 bytes")
        return cls(nacl.signing.SigningKey(bytes(seed)))

    @classmethod
    def from_multibase(cls, text: str) -> Key:
        """Parse a private key multibase (multicodec ed25519-priv 0x8026 + 32-byte seed)."""
        try:
            return cls.from_seed(decode_key(text, ED25519_PRIV))
        except ValueError as exc:
            raise InvalidKey(f"bad Ed25519 private key multibase: {exc}") from exc

    @classmethod
    def from_jwk(cls, jwk: dict[str, Any]) -> Key:
        """Parse a private OKP/Ed25519 JWK (needs ``d``); checks ``x`` matches if present."""
        if not isinstance(jwk, dict) or "d" not in jwk:
            raise InvalidKey("a private JWK needs 'd'")
        pub = PublicKey.from_jwk(jwk) if "x" in jwk else None
        try:
            key = cls.from_seed(_unb64u(jwk["d"]))
        except (ValueError, TypeError) as exc:
            raise InvalidKey(f"bad JWK 'd': {exc}") from exc
        if pub is not None and pub.raw != key.public.raw:
            raise InvalidKey("JWK 'x' does not match 'd'")
        return key

    @property
    def private_key_multibase(self) -> str:
        """The private key as multibase (ed25519-priv + seed): for key files, handle with care."""
        return encode_key(ED25519_PRIV, bytes(self._signing))

    @property
    def public_key_multibase(self) -> str:
        return self.public.multibase

    @property
    def did(self) -> str:
        return self.public.did

    @property
    def verification_method(self) -> str:
        return self.public.verification_method

    def sign(self, data: bytes) -> bytes:
        """Detached 64-byte Ed25519 signature over ``data``."""
        return self._signing.sign(data).signature

    @property
    def x25519_public(self) -> bytes:
        return self.public.x25519

    def to_jwk(self, private: bool = False) -> dict[str, str]:
        jwk = self.public.to_jwk()
        if private:
            jwk["d"] = _b64u(bytes(self._signing))
        return jwk

    def __repr__(self) -> str:
        return f"Key(did={self.did!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Key) and other.public == self.public

    def __hash__(self) -> int:
        return hash(self.public)


__all__ = ["Key", "PublicKey"]
