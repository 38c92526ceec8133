"""The coordinator's side of the device handshake: issuing credentials and single-use challenges.

The handshake itself (presentations and their checks) is :mod:`sdk.coord.handshake`, shared
with the device SDK; its names are re-exported here.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from sdk.coord.backpressure import busy_message
from sdk.coord.coordinator.errors import AdmissionError
from sdk.coord.coordinator.operations import OPERATOR_CREDENTIAL, ROLES
from sdk.coord.handshake import (
    COORDINATOR_CREDENTIAL,
    DEVICE_CREDENTIAL,
    Admitted,
    check_addressed,
    check_presentation,
    present,
)
from sdk.identity import Key

log = logging.getLogger(__name__)

V2_CONTEXT = "https://www.w3.org/ns/credentials/v2"
CHALLENGE_TTL = 30.0
RESUME_TTL = 600.0     # the next_challenge handed out with an admission
#: an admitted device may ask for a fresh ticket (``coord.ticket``) at most this often (seconds)
TICKET_RENEW_INTERVAL = RESUME_TTL / 4


def _monotonic() -> float:
    return time.monotonic()


def ticket_digest(ticket: str) -> str:
    """What the store keeps of a resumption ticket: its SHA-256, hex (the ticket never is)."""
    return hashlib.sha256(ticket.encode()).hexdigest()


def _iso(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def device_credential(issuer: Key, device_did: str, *, kind: str, groups: Iterable[str] = (),
                      capabilities: Iterable[str] = (), name: str | None = None,
                      status: Mapping[str, Any] | None = None, valid_for: float = 365 * 86400,
                      valid_from: datetime | None = None,
                      credential_type: str = DEVICE_CREDENTIAL) -> dict[str, Any]:
    """Issue a DeviceCredential (eddsa-jcs-2022) for ``device_did``: kind, groups, capabilities."""
    subject: dict[str, Any] = {"id": device_did, "kind": kind, "groups": sorted(groups),
                               "capabilities": sorted(capabilities)}
    return _issue(issuer, credential_type, subject, name=name, status=status, valid_for=valid_for,
                  valid_from=valid_from)


def _issue(issuer: Key, credential_type: str, subject: dict[str, Any], *, name: str | None,
           status: Mapping[str, Any] | None, valid_for: float, valid_from: datetime | None) -> dict[str, Any]:
    """Sign a VC 2.0 credential of ``credential_type`` about ``subject`` (valid from a minute back)."""
    from sdk.identity import issue_credential

    start = valid_from or datetime.now(UTC) - timedelta(seconds=60)
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
    signed = issue_credential(doc, issuer)
    assert isinstance(signed, dict)                  # eddsa-jcs-2022: a JSON-LD document
    return signed


def coordinator_credential(issuer: Key, coordinator_did: str, *, name: str = "coordinator",
                           valid_for: float = 365 * 86400) -> dict[str, Any]:
    """Issue the CoordinatorCredential that devices check during mutual authentication."""
    return device_credential(issuer, coordinator_did, kind="coordinator", name=name, valid_for=valid_for,
                             credential_type=COORDINATOR_CREDENTIAL)


def operator_credential(issuer: Key, operator_did: str, *, roles: Iterable[str] = ("read",),
                        name: str | None = None, valid_for: float = 90 * 86400,
                        status: Mapping[str, Any] | None = None,
                        valid_from: datetime | None = None) -> dict[str, Any]:
    """Issue an OperatorCredential: ``roles`` from ``read`` / ``write`` / ``admin`` (cumulative)."""
    roles = sorted(set(roles))
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise ValueError(f"roles must be a non-empty subset of {ROLES}, got {roles}")
    return _issue(issuer, OPERATOR_CREDENTIAL, {"id": operator_did, "roles": roles}, name=name, status=status,
                  valid_for=valid_for, valid_from=valid_from)


class Challenges:
    """Fresh, single-use challenges with a short lifetime, at most ``limit`` open at once.

    Challenges are kept per lifetime (a hello's 30 s, a resumption ticket's 10 minutes), each in
    the order issued, so expiry pops only what is due. At the limit the oldest resumption tickets
    (``ttl`` longer than the default) make room first: a device whose ticket is gone falls back to
    a full handshake. When only live handshake challenges are left (a flood of hellos), a new one
    is refused with :class:`AdmissionError` ``busy``, and the challenges already handed out stay
    valid. ``evicted`` and ``refused`` count both cases.

    Resumption tickets outlive the instance that issued them: the device record keeps the digest
    and wall-clock expiry of its latest ticket (:func:`ticket_digest`), and an instance that loads
    the store restores them (:meth:`restore`, one per device, the latest), so a device re-admits by ticket
    with whichever instance holds the lease. A restored ticket is single use like any other.
    ``clock`` (monotonic seconds) is injectable for tests.
    """

    def __init__(self, ttl: float = CHALLENGE_TTL, limit: int = 100_000, *,
                 clock: Callable[[], float] | None = None) -> None:
        if ttl <= 0 or limit < 1:
            raise ValueError("ttl must be positive and limit at least 1")
        self.ttl = ttl
        self.limit = limit
        self.clock: Callable[[], float] = clock or _monotonic
        #: DID -> (ticket digest, deadline): tickets issued by an earlier instance, from the store
        self._restored: dict[str, tuple[str, float]] = {}
        #: restored tickets accepted
        self.restored_used = 0
        #: lifetime -> challenge -> (DID, deadline), oldest first (one lifetime: deadlines ascending)
        self._open: dict[float, OrderedDict[str, tuple[str, float]]] = {}
        self._count = 0
        #: tickets dropped to make room; challenges refused because only live handshakes were open
        self.evicted = 0
        self.refused = 0

    def __len__(self) -> int:
        return self._count

    def issue(self, did: str, *, ttl: float | None = None) -> str:
        """A new challenge for ``did`` (valid ``ttl`` seconds, default the instance's); raises
        :class:`AdmissionError` ``busy`` when ``limit`` challenges are open and none can go."""
        ttl = self.ttl if ttl is None else ttl
        now = self.clock()
        if self._count >= self.limit:
            self.sweep(now)
            if self._count >= self.limit and not self._evict_ticket():
                self.refused += 1
                log.warning("challenge for %s refused: %d handshakes open (the limit)", did, self._count)
                raise AdmissionError(busy_message(self.ttl / 10), reason="busy")
        value = secrets.token_urlsafe(18)
        bucket = self._open.get(ttl)
        if bucket is None:
            bucket = self._open[ttl] = OrderedDict()
        bucket[value] = (did, now + ttl)
        self._count += 1
        return value

    def consume(self, challenge: Any, did: str) -> None:
        """Accept ``challenge`` once, from the DID it was issued to; raise wrong_challenge."""
        entry = None
        if isinstance(challenge, str):
            for bucket in self._open.values():
                entry = bucket.pop(challenge, None)
                if entry is not None:
                    self._count -= 1
                    break
            if entry is None and did in self._restored and len(challenge) <= 128:
                digest, deadline = self._restored[did]
                if hmac.compare_digest(digest, ticket_digest(challenge)):
                    del self._restored[did]             # single use
                    entry = (did, deadline)
                    self.restored_used += 1
        if entry is None or entry[0] != did or entry[1] < self.clock():
            raise AdmissionError("unknown, reused or expired challenge", reason="wrong_challenge")

    def restore(self, did: str, digest: str, expires: float, *, now: float | None = None) -> bool:
        """Accept once, until ``expires`` (wall clock), the ticket whose digest is ``digest`` for
        ``did`` (the latest one its record holds); False when it has expired already."""
        remaining = expires - (time.time() if now is None else now)
        if remaining <= 0 or not isinstance(digest, str):
            return False
        self._restored[did] = (digest, self.clock() + remaining)
        return True

    def forget_restored(self, did: str) -> None:
        """Drop ``did``'s restored ticket (its record now holds a newer one, or none)."""
        self._restored.pop(did, None)

    @property
    def restored(self) -> int:
        """Restored tickets not used yet (expired ones included until the next sweep)."""
        return len(self._restored)

    def sweep(self, now: float | None = None) -> int:
        """Drop expired challenges (work proportional to those dropped); returns how many."""
        now = self.clock() if now is None else now
        dropped = 0
        for bucket in self._open.values():
            while bucket:
                value, (_did, deadline) = next(iter(bucket.items()))
                if deadline >= now:
                    break
                del bucket[value]
                dropped += 1
        self._count -= dropped
        return dropped

    def _evict_ticket(self) -> bool:
        """Drop the oldest challenge of the longest lifetime above the default (a resumption ticket)."""
        for ttl in sorted((t for t, b in self._open.items() if b and t > self.ttl), reverse=True):
            self._open[ttl].popitem(last=False)
            self._count -= 1
            self.evicted += 1
            return True
        return False


__all__ = [
    "DEVICE_CREDENTIAL",
    "COORDINATOR_CREDENTIAL",
    "OPERATOR_CREDENTIAL",
    "Admitted",
    "Challenges",
    "RESUME_TTL",
    "TICKET_RENEW_INTERVAL",
    "check_addressed",
    "check_presentation",
    "coordinator_credential",
    "device_credential",
    "operator_credential",
    "present",
    "ticket_digest",
]
