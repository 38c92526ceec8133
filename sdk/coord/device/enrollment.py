"""A device's side of the credential lifecycle: enrollment, automatic renewal and key rotation.

    credential = await enroll(key, broker=url, coordinator=coord_did, token="agt_...")
    credential = await enroll(key, broker=url, coordinator=coord_did, manufacturer_credential=mvc)
    device = Device(key, credential, broker=url, coordinator=coord_did, renew_after=2 / 3,
                    credential_file="device-vc.json")            # renews itself before expiry
    new_credential = await rotate_key(old_key, new_key, broker=url, coordinator=coord_did)

Replies are accepted only from the coordinator's DID (signed envelopes), requests carrying a
token are encrypted to it, and an issued credential is checked (signature, subject = this
device, a DeviceCredential from a trusted issuer) before it is used or stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdk.coord import protocol
from sdk.coord.errors import AdmissionError, NotAdmitted
from sdk.coord.handshake import DEVICE_CREDENTIAL, present
from sdk.errors import CoordinationError
from sdk.identity import Key, TrustPolicy, verify_credential
from sdk.identity.datetimes import parse_datetime
from sdk.identity.errors import IdentityError
from sdk.identity.hazmat.b64 import b64url_encode
from sdk.identity.hazmat.jcs import canonicalize
from sdk.messaging.broker_auth import did_credentials
from sdk.messaging.client import SecureClient
from sdk.messaging.errors import MessagingError, RemoteError, RequestTimeout

if TYPE_CHECKING:
    from sdk.coord.device.client import Device

log = logging.getLogger(__name__)

ROTATION_PURPOSE = "autoglm-key-rotation"
DEFAULT_RENEW_AFTER = 2 / 3
_POLL_MIN, _POLL_MAX = 0.25, 2.0


class EnrollmentError(CoordinationError):
    """Enrollment, renewal or rotation failed: ``reason`` is the coordinator's (token_used,
    token_expired, not_authorized, denied, untrusted_issuer, revoked, not_issuer, busy...) or
    ``pending`` (not approved within ``wait``), ``timeout``, ``bad_credential``."""

    reason = "enrollment_failed"


def write_credential(path: str | os.PathLike[str], credential: Mapping[str, Any] | str) -> None:
    """Write a credential file atomically (a crash leaves the old file or the new one)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{secrets.token_hex(4)}.tmp")
    text = credential if isinstance(credential, str) else json.dumps(credential, indent=1, sort_keys=True)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, p)


def check_issued(credential: Any, did: str, *, trust: TrustPolicy | None = None) -> dict[str, Any]:
    """Verify a credential the coordinator issued to ``did``; raise ``bad_credential`` otherwise.

    Its status entry is not checked here (the device may not hold the list yet)."""
    if not isinstance(credential, dict):
        raise EnrollmentError("the coordinator sent no credential", reason="bad_credential")
    policy = trust if trust is not None else TrustPolicy.ANY
    result = verify_credential(credential, trust=policy, check_status=False)
    subject = credential.get("credentialSubject")
    types = credential.get("type") or []
    problem = None
    if not result.verified:
        problem = "; ".join(result.messages) or "does not verify"
    elif not isinstance(subject, dict) or subject.get("id") != did:
        problem = f"it is not issued to {did}"
    elif DEVICE_CREDENTIAL not in types:
        problem = f"it is not a {DEVICE_CREDENTIAL}"
    elif trust is not None and not trust.allows(str(result.issuer), [DEVICE_CREDENTIAL]):
        problem = f"its issuer {result.issuer} is not trusted"
    if problem:
        log.warning("credential from the coordinator refused: %s", problem)
        raise EnrollmentError(f"issued credential refused: {problem}", reason="bad_credential")
    return credential


async def _request(client: SecureClient, coordinator: str, type_: str, body: dict[str, Any], *,
                   timeout: float, encrypt: bool = False) -> dict[str, Any]:
    topic = protocol.device_commands(protocol.token(coordinator))
    try:
        msg = await client.request(topic, body, type=type_, timeout=timeout, expect_from=coordinator,
                                   encrypt_to=coordinator if encrypt else None)
    except RemoteError as exc:
        raise EnrollmentError(f"coordinator refused {type_}: {exc}", reason=exc.reason) from exc
    except RequestTimeout as exc:
        raise EnrollmentError(f"no answer from the coordinator to {type_}", reason="timeout") from exc
    return msg.body if isinstance(msg.body, dict) else {}


async def _challenge(client: SecureClient, coordinator: str, timeout: float) -> str:
    body = await _request(client, coordinator, protocol.HELLO, {}, timeout=timeout)
    challenge = body.get("challenge")
    if not isinstance(challenge, str):
        raise EnrollmentError("coordinator sent no challenge", reason="malformed")
    return challenge


async def enroll(key: Key, *, broker: str, coordinator: str, token: str | None = None,
                 manufacturer_credential: Mapping[str, Any] | str | None = None, wait: float = 60.0,
                 trust: TrustPolicy | None = None, credential_file: str | os.PathLike[str] | None = None,
                 timeout: float = 5.0, **transport_options: Any) -> dict[str, Any]:
    """Obtain a DeviceCredential for ``key`` from ``coordinator``; waits up to ``wait`` s for a
    manual approval. Raises :class:`EnrollmentError` with the coordinator's reason."""
    if (token is None) == (manufacturer_credential is None):
        raise ValueError("give exactly one of token= or manufacturer_credential=")
    coordinator = coordinator.partition("#")[0]
    options = {**did_credentials(key), **transport_options}
    async with SecureClient(broker, key, **options) as client:
        if token is not None:
            body: dict[str, Any] = {"token": token}
        else:
            assert manufacturer_credential is not None
            challenge = await _challenge(client, coordinator, timeout)
            body = {"challenge": challenge,
                    "vp": present(manufacturer_credential, key, challenge=challenge, domain=coordinator)}
        reply = await _request(client, coordinator, protocol.ENROLL, body, timeout=timeout, encrypt=True)
        deadline = time.monotonic() + wait
        delay = _POLL_MIN
        while reply.get("status") == "pending":
            request_id = reply.get("id")
            if not isinstance(request_id, str):
                raise EnrollmentError("pending reply without a request id", reason="malformed")
            if time.monotonic() + delay > deadline:
                raise EnrollmentError(f"enrollment request {request_id} not approved within {wait}s",
                                      reason="pending")
            log.info("enrollment request %s pending approval; asking again in %.2fs", request_id, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _POLL_MAX)
            reply = await _request(client, coordinator, protocol.ENROLL, {"poll": request_id}, timeout=timeout)
    credential = check_issued(reply.get("credential"), key.did, trust=trust)
    if credential_file is not None:
        write_credential(credential_file, credential)
    log.info("device %s enrolled with %s", key.did, coordinator)
    return credential


async def rotate_key(old_key: Key, new_key: Key, *, broker: str, coordinator: str,
                     trust: TrustPolicy | None = None, credential_file: str | os.PathLike[str] | None = None,
                     timeout: float = 5.0, **transport_options: Any) -> dict[str, Any]:
    """Move the device's credential to ``new_key``: the old key signs (new DID, coordinator DID,
    a fresh challenge); the coordinator issues to the new DID and revokes the old one."""
    coordinator = coordinator.partition("#")[0]
    options = {**did_credentials(new_key), **transport_options}
    async with SecureClient(broker, new_key, **options) as client:
        challenge = await _challenge(client, coordinator, timeout)
        payload = {"purpose": ROTATION_PURPOSE, "new": new_key.did, "coordinator": coordinator,
                   "challenge": challenge}
        proof = b64url_encode(old_key.sign(canonicalize(payload))).decode()
        reply = await _request(client, coordinator, protocol.ROTATE,
                               {"old": old_key.did, "challenge": challenge, "proof": proof}, timeout=timeout)
    credential = check_issued(reply.get("credential"), new_key.did, trust=trust)
    if credential_file is not None:
        write_credential(credential_file, credential)
    log.info("key rotated: %s -> %s", old_key.did, new_key.did)
    return credential


def _validity(credential: Any) -> tuple[float, float] | None:
    """``(validFrom, validUntil)`` as epoch seconds, or None without an end."""
    if not isinstance(credential, dict):
        return None
    end = credential.get("validUntil", credential.get("expirationDate"))
    start = credential.get("validFrom", credential.get("issuanceDate"))
    if end is None:
        return None
    try:
        until = parse_datetime(end).timestamp()
        since = parse_datetime(start).timestamp() if start is not None else until
    except (IdentityError, ValueError, TypeError):
        return None
    return since, until


class Renewal:
    """Renews a :class:`Device`'s credential at ``renew_after`` of its validity, then
    re-authenticates with it while still admitted (so admission never lapses); failures are
    retried with backoff until the old credential runs out."""

    def __init__(self, device: Device, *, renew_after: float = DEFAULT_RENEW_AFTER,
                 credential_file: str | os.PathLike[str] | None = None) -> None:
        if not 0 < renew_after < 1:
            raise ValueError("renew_after must be a fraction between 0 and 1")
        self.device = device
        self.renew_after = renew_after
        self.credential_file = Path(credential_file) if credential_file is not None else None
        self.renewed = 0
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._current: asyncio.Task[None] | None = None
        self._unproven = False          # renewed, not yet presented to the coordinator

    def due(self) -> float | None:
        """When the current credential should be renewed (epoch seconds), or None."""
        validity = _validity(self.device.credential)
        if validity is None:
            return None
        since, until = validity
        return since + (until - since) * self.renew_after

    def schedule(self) -> None:
        """(Re)start the timer for the current credential (called on each admission)."""
        if self._current is not None and self._current is asyncio.current_task():
            return                              # the renewal's own re-authentication: its loop goes on
        self.cancel()
        if self.due() is not None:
            self._task = asyncio.ensure_future(self._run())

    def cancel(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = None

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _run(self) -> None:
        self._current = asyncio.current_task()
        delay = 1.0
        while True:
            validity = _validity(self.device.credential)
            due = self.due()
            if due is None or validity is None:
                return
            if not self._unproven:
                wait = due - time.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            if not self.device.admitted:
                try:
                    await self.device.wait_admitted(None)
                except NotAdmitted:                             # revoked or closed: nothing to renew
                    return
                continue
            try:
                if self._unproven:
                    await self._reauthenticate()
                else:
                    await self.renew_once()
                delay = 1.0
            except (EnrollmentError, CoordinationError, MessagingError) as exc:
                self.last_error = getattr(exc, "reason", "error")
                if self.last_error in ("not_issuer", "unknown_command", "revoked", "not_admitted"):
                    log.warning("device %s: credential not renewed (%s)", self.device.did, self.last_error)
                    if self.last_error != "not_admitted":     # final: this coordinator cannot renew it
                        return
                left = validity[1] - time.time()
                delay = min(delay * 2, max(0.5, left / 4))
                log.warning("device %s: renewal failed (%s); retrying in %.1fs (%.0fs of validity left)",
                            self.device.did, self.last_error, delay, left)
                await asyncio.sleep(delay)

    async def renew_once(self) -> dict[str, Any]:
        """Ask the coordinator for a renewed credential, check it, store it and re-authenticate."""
        dev = self.device
        old = dev.credential
        issuer = old.get("issuer") if isinstance(old, dict) else None
        issuer = issuer.get("id") if isinstance(issuer, dict) else issuer
        trust = TrustPolicy({issuer: {DEVICE_CREDENTIAL}}) if isinstance(issuer, str) else None
        reply = await _request(dev.client, dev.coordinator, protocol.RENEW, {}, timeout=dev.auth_timeout)
        credential = check_issued(reply.get("credential"), dev.did, trust=trust)
        if self.credential_file is not None:
            await asyncio.to_thread(write_credential, self.credential_file, credential)
        dev.update_credential(credential)
        self._unproven = True
        log.info("device %s: credential renewed (valid until %s)", dev.did, credential.get("validUntil"))
        await self._reauthenticate()
        return credential

    async def _reauthenticate(self) -> None:
        """Present the renewed credential while the current session goes on: a failure that is not
        final (timeout, busy) leaves the device admitted with the old one, and is retried."""
        dev = self.device
        try:
            await dev._handshake(True)  # noqa: SLF001 - the session stays up while this runs
        except AdmissionError as exc:
            if exc.reason in ("revoked", "expired"):
                dev._refused(exc)  # noqa: SLF001 - final answers change the device's state
            raise
        self._unproven = False
        self.renewed += 1                       # renewed and admitted with it
        self.last_error = None


__all__ = ["DEFAULT_RENEW_AFTER", "EnrollmentError", "Renewal", "check_issued", "enroll", "rotate_key",
           "write_credential"]
