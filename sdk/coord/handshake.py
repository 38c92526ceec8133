"""The DID + Verifiable Presentation handshake both sides of coordination run.

Direct (one round trip): device → coordinator ``coord.present`` {challenge, vp, nonce} where the
challenge is the id of the request envelope itself (fresh and single use by the envelope checks)
and ``vp`` presents the device's DeviceCredential over it (domain = the coordinator's DID); the
reply carries a presentation of the coordinator's CoordinatorCredential over the device's nonce
(so the device knows it talks to a coordinator its issuers vouch for).

With a handed-out challenge (two round trips, for coordinators that take no direct one):

1. device → coordinator ``coord.hello`` {nonce?}: the coordinator answers with a fresh single-use
   ``challenge`` (and, given a nonce, its presentation over it).
2. device → coordinator ``coord.present`` {challenge, vp, nonce?}: the device's presentation over
   that challenge.

:func:`present` makes a presentation, :func:`check_presentation` verifies one and maps the
identity layer's reasons onto :class:`~sdk.coord.errors.AdmissionError` reasons:
untrusted_issuer, revoked, expired, not_yet_valid, wrong_challenge, bad_signature,
holder_mismatch, missing_credential, malformed, status_unavailable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sdk.coord.errors import AdmissionError
from sdk.identity import Key

DEVICE_CREDENTIAL = "DeviceCredential"
COORDINATOR_CREDENTIAL = "CoordinatorCredential"

#: identity reason -> admission reason (most are the same words)
_REASON_MAP = {
    "untrusted_issuer": "untrusted_issuer",
    "revoked": "revoked",
    "suspended": "revoked",
    "expired": "expired",
    "not_yet_valid": "not_yet_valid",
    "wrong_challenge": "wrong_challenge",
    "wrong_domain": "wrong_challenge",
    "bad_signature": "bad_signature",
    "holder_mismatch": "holder_mismatch",
    "malformed": "malformed",
    "status_unavailable": "status_unavailable",
    "unresolvable": "bad_signature",
    "key_not_authorized": "bad_signature",
    "wrong_proof_purpose": "bad_signature",
    "unsupported_proof": "malformed",
    "invalid_key": "malformed",
}
#: when several reasons apply, report the most specific first
_PRIORITY = ("revoked", "untrusted_issuer", "expired", "not_yet_valid", "wrong_challenge",
             "holder_mismatch", "bad_signature", "status_unavailable", "malformed")


def present(credential: Mapping[str, Any] | str, key: Key, *, challenge: str,
            domain: str) -> dict[str, Any] | str:
    """A presentation of ``credential`` by its holder ``key`` over ``challenge``/``domain``."""
    from sdk.identity import create_presentation

    return create_presentation([credential], key, challenge=challenge, domain=domain)


def check_addressed(vp: Any, *, challenge: str, holder: str) -> None:
    """Cheap checks before any signature is verified: a Data Integrity presentation must claim
    ``challenge`` and ``holder`` (raises :class:`AdmissionError` wrong_challenge / holder_mismatch).

    The claims are unverified here; :func:`check_presentation` verifies them. Anything else
    (a VP-JWT, a malformed presentation) is left to it."""
    if not isinstance(vp, Mapping):
        return
    proof, claimed = vp.get("proof"), vp.get("holder")
    if isinstance(claimed, Mapping):
        claimed = claimed.get("id")
    if isinstance(proof, Mapping) and proof.get("challenge") != challenge:
        raise AdmissionError("presentation is not over this challenge", reason="wrong_challenge")
    if isinstance(claimed, str) and claimed != holder:
        raise AdmissionError(f"presentation holder {claimed} is not the sender {holder}", reason="holder_mismatch")


@dataclass(frozen=True)
class Admitted:
    """A verified presentation: holder DID and its credential."""

    holder: str
    credential: dict[str, Any]
    subject: dict[str, Any]
    issuer: str
    credential_id: str | None


def check_presentation(vp: Any, *, challenge: str, domain: str, trust: Any, status: Any = None,
                       credential_type: str = DEVICE_CREDENTIAL, expected_holder: str | None = None,
                       now: datetime | None = None) -> Admitted:
    """Verify ``vp`` fully; return who it admits or raise :class:`AdmissionError` with a reason."""
    from sdk.identity import verify_presentation

    if not isinstance(vp, (dict, str)):
        raise AdmissionError("presentation missing or not an object", reason="malformed")
    try:
        result = verify_presentation(vp, challenge=challenge, domain=domain, trust=trust, status=status,
                                     now=now)
    except (TypeError, ValueError) as exc:
        raise AdmissionError(f"malformed presentation: {exc}", reason="malformed") from exc
    if not result.verified:
        reasons = [_REASON_MAP.get(e, "malformed") for e in result.errors] or ["malformed"]
        reason = next((r for r in _PRIORITY if r in reasons), reasons[0])
        detail = "; ".join(result.messages) or reason
        raise AdmissionError(f"presentation rejected: {detail}", reason=reason)
    holder = result.holder
    if expected_holder is not None and holder != expected_holder:
        raise AdmissionError(f"presentation holder {holder} is not the sender {expected_holder}",
                             reason="holder_mismatch")
    for cred_result in result.credentials:
        if credential_type in cred_result.types:
            cred = cred_result.credential or {}
            subject = cred.get("credentialSubject") or {}
            if isinstance(subject, list):
                subject = subject[0] if subject else {}
            return Admitted(holder or "", cred, dict(subject), cred_result.issuer or "", cred.get("id"))
    raise AdmissionError(f"presentation holds no {credential_type}", reason="missing_credential")


__all__ = ["DEVICE_CREDENTIAL", "COORDINATOR_CREDENTIAL", "Admitted", "check_addressed", "check_presentation",
           "present"]
