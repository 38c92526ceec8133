"""DID + Verifiable Presentation mutual authentication between devices and the coordinator.

1. device → coordinator ``coord.hello`` {nonce}: the coordinator answers with a fresh single-use
   ``challenge`` and a presentation of its CoordinatorCredential bound to the device's nonce
   (so the device knows it talks to a coordinator its issuers vouch for).
2. device → coordinator ``coord.present`` {challenge, vp}: a presentation of the device's
   DeviceCredential over that challenge (domain = the coordinator's DID). Admission fails with a
   clear reason: untrusted_issuer, revoked, expired, not_yet_valid, wrong_challenge,
   bad_signature, holder_mismatch, missing_credential, malformed.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sdk.coord.coordinator.errors import AdmissionError
from sdk.identity import Key

log = logging.getLogger(__name__)

DEVICE_CREDENTIAL = "DeviceCredential"
COORDINATOR_CREDENTIAL = "CoordinatorCredential"
V2_CONTEXT = "https://www.w3.org/ns/credentials/v2"
CHALLENGE_TTL = 30.0
RESUME_TTL = 600.0     # the next_challenge handed out with an admission

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


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def device_credential(issuer: Key, device_did: str, *, kind: str, groups: Iterable[str] = (),
                      capabilities: Iterable[str] = (), name: str | None = None,
                      status: Mapping[str, Any] | None = None, valid_for: float = 365 * 86400,
                      valid_from: datetime | None = None,
                      credential_type: str = DEVICE_CREDENTIAL) -> dict[str, Any]:
    """Issue a DeviceCredential (eddsa-jcs-2022) for ``device_did``: kind, groups, capabilities."""
    from sdk.identity import issue_credential

    start = valid_from or datetime.now(UTC) - timedelta(seconds=60)
    subject: dict[str, Any] = {"id": device_did, "kind": kind, "groups": sorted(groups),
                               "capabilities": sorted(capabilities)}
    if name:
        subject["name"] = name
    doc: dict[str, Any] = {
        "@context": [V2_CONTEXT],
        "id": f"urn:uuid:{secrets.token_hex(16)}",
        "type": ["VerifiableCredential", credential_type],
        "issuer": issuer.did,
        "validFrom": _iso(start),
        "validUntil": _iso(start + timedelta(seconds=valid_for)),
        "credentialSubject": subject,
    }
    if status is not None:
        doc["credentialStatus"] = dict(status)
    return issue_credential(doc, issuer)


def coordinator_credential(issuer: Key, coordinator_did: str, *, name: str = "coordinator",
                           valid_for: float = 365 * 86400) -> dict[str, Any]:
    """Issue the CoordinatorCredential that devices check during mutual authentication."""
    return device_credential(issuer, coordinator_did, kind="coordinator", name=name, valid_for=valid_for,
                             credential_type=COORDINATOR_CREDENTIAL)


def present(credential: Mapping[str, Any] | str, key: Key, *, challenge: str, domain: str) -> dict[str, Any]:
    """A presentation of ``credential`` by its holder ``key`` over ``challenge``/``domain``."""
    from sdk.identity import create_presentation

    return create_presentation([credential], key, challenge=challenge, domain=domain)


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


class Challenges:
    """Fresh, single-use challenges with a short lifetime."""

    def __init__(self, ttl: float = CHALLENGE_TTL, limit: int = 100_000) -> None:
        self.ttl = ttl
        self.limit = limit
        self._open: dict[str, tuple[str, float]] = {}

    def issue(self, did: str, *, ttl: float | None = None) -> str:
        """A new challenge for ``did`` (valid ``ttl`` seconds, default the instance's)."""
        if len(self._open) >= self.limit:
            self.sweep()
        value = secrets.token_urlsafe(18)
        self._open[value] = (did, time.monotonic() + (self.ttl if ttl is None else ttl))
        return value

    def consume(self, challenge: Any, did: str) -> None:
        """Accept ``challenge`` once, from the DID it was issued to; raise wrong_challenge."""
        entry = self._open.pop(challenge, None) if isinstance(challenge, str) else None
        if entry is None or entry[0] != did or entry[1] < time.monotonic():
            raise AdmissionError("unknown, reused or expired challenge", reason="wrong_challenge")

    def sweep(self) -> None:
        """Drop expired challenges."""
        now = time.monotonic()
        self._open = {k: v for k, v in self._open.items() if v[1] >= now}


__all__ = [
    "DEVICE_CREDENTIAL",
    "COORDINATOR_CREDENTIAL",
    "Admitted",
    "Challenges",
    "check_presentation",
    "coordinator_credential",
    "device_credential",
    "present",
]
