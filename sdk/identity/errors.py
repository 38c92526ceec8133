"""Identity-layer errors. Each has a distinct, stable ``reason`` code.

    IdentityError (sdk.errors)          reason
    ├── InvalidKey                      invalid_key
    ├── InvalidSignature                bad_signature
    ├── ResolutionError                 unresolvable
    ├── MalformedError                  malformed
    ├── UnsupportedProof                unsupported_proof
    ├── WrongProofPurpose               wrong_proof_purpose
    ├── KeyNotAuthorized                key_not_authorized
    ├── Expired                         expired
    ├── NotYetValid                     not_yet_valid
    ├── Revoked                         revoked
    ├── Suspended                       suspended
    ├── StatusUnavailable               status_unavailable
    ├── UntrustedIssuer                 untrusted_issuer
    ├── WrongChallenge                  wrong_challenge
    ├── WrongDomain                     wrong_domain
    └── HolderMismatch                  holder_mismatch
"""

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


class MalformedError(IdentityError):
    """A credential, presentation or proof is not well formed."""

    reason = "malformed"


class UnsupportedProof(IdentityError):
    """The proof type or cryptosuite is not one this SDK verifies."""

    reason = "unsupported_proof"


class WrongProofPurpose(IdentityError):
    """The proof's purpose is not the one required (assertionMethod / authentication)."""

    reason = "wrong_proof_purpose"


class KeyNotAuthorized(IdentityError):
    """The verification method is not controlled by the issuer/holder or not authorized for the purpose."""

    reason = "key_not_authorized"


class Expired(IdentityError):
    """validUntil / expirationDate / exp is in the past."""

    reason = "expired"


class NotYetValid(IdentityError):
    """validFrom / issuanceDate / nbf is in the future."""

    reason = "not_yet_valid"


class Revoked(IdentityError):
    """The credential's revocation bit is set in its status list."""

    reason = "revoked"


class Suspended(IdentityError):
    """The credential's suspension bit is set in its status list."""

    reason = "suspended"


class StatusUnavailable(IdentityError):
    """The status list could not be fetched, verified or read."""

    reason = "status_unavailable"


class UntrustedIssuer(IdentityError):
    """The trust policy does not allow this issuer to issue this credential type."""

    reason = "untrusted_issuer"


class WrongChallenge(IdentityError):
    """A presentation's challenge (nonce) is missing or differs from the expected one."""

    reason = "wrong_challenge"


class WrongDomain(IdentityError):
    """A presentation's domain (audience) differs from the expected one."""

    reason = "wrong_domain"


class HolderMismatch(IdentityError):
    """A credential's subject is not the presentation's holder."""

    reason = "holder_mismatch"


ERRORS_BY_REASON: dict[str, type[IdentityError]] = {
    cls.reason: cls
    for cls in (
        InvalidKey, InvalidSignature, ResolutionError, MalformedError, UnsupportedProof,
        WrongProofPurpose, KeyNotAuthorized, Expired, NotYetValid, Revoked, Suspended,
        StatusUnavailable, UntrustedIssuer, WrongChallenge, WrongDomain, HolderMismatch,
    )
}

__all__ = [
    "IdentityError",
    "InvalidKey",
    "InvalidSignature",
    "ResolutionError",
    "MalformedError",
    "UnsupportedProof",
    "WrongProofPurpose",
    "KeyNotAuthorized",
    "Expired",
    "NotYetValid",
    "Revoked",
    "Suspended",
    "StatusUnavailable",
    "UntrustedIssuer",
    "WrongChallenge",
    "WrongDomain",
    "HolderMismatch",
    "ERRORS_BY_REASON",
]
