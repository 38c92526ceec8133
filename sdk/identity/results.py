"""``VerificationResult``: what ``verify_credential`` / ``verify_presentation`` return."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sdk.identity.errors import ERRORS_BY_REASON, IdentityError


@dataclass
class VerificationResult:
    """Outcome of a verification. ``errors`` holds machine-readable reason codes, in order.

    ``messages`` holds one human-readable line per error. For presentations ``credentials``
    holds one result per embedded credential (their errors are also merged into ``errors``).
    """

    verified: bool = False
    errors: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    credential: dict[str, Any] | None = None
    presentation: dict[str, Any] | None = None
    issuer: str | None = None
    holder: str | None = None
    subject: str | None = None
    types: list[str] = field(default_factory=list)
    proof_format: str | None = None
    verification_method: str | None = None
    issued_at: datetime | None = None
    expires_at: datetime | None = None
    credentials: list[VerificationResult] = field(default_factory=list)

    def add_error(self, reason: str, message: str = "") -> None:
        if reason not in self.errors:
            self.errors.append(reason)
            self.messages.append(message or reason)
        self.verified = False

    def add_exception(self, exc: IdentityError) -> None:
        self.add_error(exc.reason, str(exc))

    def __bool__(self) -> bool:
        return self.verified

    def raise_for_errors(self) -> VerificationResult:
        """Strict mode: raise the IdentityError subclass for the first error, else return self."""
        if self.verified and not self.errors:
            return self
        reason = self.errors[0] if self.errors else "malformed"
        cls = ERRORS_BY_REASON.get(reason, IdentityError)
        message = self.messages[0] if self.messages else reason
        raise cls(message, reason=reason)


__all__ = ["VerificationResult"]
