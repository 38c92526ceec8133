"""Identity-layer errors. Each has a distinct, stable ``reason`` code."""

from __future__ import annotations

from sdk.errors import IdentityError


class InvalidKey(IdentityError):
    """A key, multibase string or JWK could not be parsed."""

    reason = "invalid_key"


class InvalidSignature(IdentityError):
    """A signature did not verify."""

    reason = "bad_signature"


class ResolutionError(IdentityError):
    """A DID or verification method could not be resolved."""

    reason = "unresolvable"


__all__ = ["IdentityError", "InvalidKey", "InvalidSignature", "ResolutionError"]
