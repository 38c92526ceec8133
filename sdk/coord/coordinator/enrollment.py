"""The credential lifecycle on a coordinator with an issuer key: enrollment, renewal, key
rotation and revocation by DID.

Device requests on the coordinator's command topic (behind the same per-sender gate as the
handshake, so unknown senders stay rate limited):

    coord.enroll  {token}                     one-time enrollment token (``enroll.token``)
                  {vp, challenge}             presentation of a ManufacturerCredential over a
                                              challenge from ``coord.hello`` (domain = coordinator DID)
                  {poll: id}                  a pending (manual) request: pending, issued or denied
    coord.renew   {}                          an admitted device whose credential this issuer signed:
                                              a fresh validity period, the SAME status index
    coord.rotate  {old, challenge, proof}     from the NEW did:key; ``proof`` = the old key's Ed25519
                                              signature (base64url) over the JCS of
                                              :func:`rotation_payload`; the old DID's indexes are revoked

Replies: ``{"status": "issued", "credential", "id", "renew_after"}`` or ``{"status": "pending", "id"}``.
Operator operations: ``enroll.token``, ``enroll.pending``, ``enroll.approve``, ``enroll.deny``
(admin) and ``device.revoke`` (admin). Tokens are stored only as their SHA-256.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sdk.coord import protocol
from sdk.coord.coordinator.admission import SenderLimiter
from sdk.coord.coordinator.auth import check_presentation, device_credential
from sdk.coord.coordinator.config import IssuerConfig
from sdk.coord.coordinator.errors import CoordinationError
from sdk.coord.coordinator.operations import OperatorRequest
from sdk.coord.coordinator.registry import REVOKED
from sdk.coord.errors import OperatorError
from sdk.identity import Key, public_key_from_did_key, status_entry
from sdk.identity.errors import IdentityError
from sdk.identity.hazmat.b64 import b64url_decode
from sdk.identity.hazmat.jcs import canonicalize
from sdk.identity.status_ledger import OFFLINE_RANGE, StatusLedger, StatusLedgerError, ledger_path
from sdk.messaging.envelope import Message
from sdk.messaging.errors import MessagingError

if TYPE_CHECKING:
    from sdk.coord.coordinator.daemon import Coordinator

log = logging.getLogger(__name__)

MANUFACTURER_CREDENTIAL = "ManufacturerCredential"
ROTATION_PURPOSE = "autoglm-key-rotation"
MAX_TOKEN_TTL = 30 * 86400.0
MAX_VALID_FOR = 10 * 365 * 86400.0
MAX_TOKEN_USES = 100_000
_MAX_NAME = 128
_MAX_GROUPS = 64


class EnrollmentRefused(CoordinationError):
    """A device's enrollment, renewal or rotation request was refused (``reason`` says why)."""

    reason = "not_authorized"


def token_hash(token: str) -> str:
    """What the store keeps of an enrollment token."""
    return hashlib.sha256(token.encode()).hexdigest()


def rotation_payload(new_did: str, coordinator_did: str, challenge: str) -> dict[str, str]:
    """The document the OLD key signs (JCS, Ed25519) to hand its credential to ``new_did``."""
    return {"purpose": ROTATION_PURPOSE, "new": new_did, "coordinator": coordinator_did, "challenge": challenge}


def load_issuer_key(config: IssuerConfig) -> Key:
    """The ``[issuer]`` key: ``key`` (multibase), else the keystore (passphrase from the env)."""
    if config.key_multibase:
        try:
            return Key.from_multibase(config.key_multibase)
        except (IdentityError, ValueError) as exc:
            raise CoordinationError(f"issuer.key is not a private key multibase: {exc}",
                                    reason="invalid_config_file") from exc
    if config.keystore is None:
        raise CoordinationError("[issuer] needs keystore or key", reason="invalid_config_file")
    from sdk.identity import load_key as load_identity_key

    passphrase = os.environ.get(config.passphrase_env)
    if passphrase is None:
        raise CoordinationError(f"set ${config.passphrase_env} to the issuer keystore's passphrase",
                                reason="invalid_config_file")
    return load_identity_key(config.keystore, passphrase=passphrase)


def _param(params: Mapping[str, Any], name: str, kinds: type | tuple[type, ...], default: Any = None, *,
           required: bool = False) -> Any:
    value = params.get(name, default)
    if value is None and not required:
        return None
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, kinds):
        raise OperatorError(f"parameter {name!r} is missing or has the wrong type", reason="invalid_params")
    return value


def _number(params: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    value = _param(params, name, (int, float), default)
    if value is None or not lo <= float(value) <= hi:
        raise OperatorError(f"parameter {name!r} must be a number in [{lo:g}, {hi:g}]", reason="invalid_params")
    return float(value)


def _names(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > _MAX_GROUPS \
            or not all(isinstance(g, str) and 0 < len(g) <= _MAX_NAME for g in value):
        raise OperatorError(f"parameter {what!r} must be a list of at most {_MAX_GROUPS} names",
                            reason="invalid_params")
    return sorted(set(value))


def _period(credential: Mapping[str, Any]) -> float | None:
    """The validity period (seconds) of ``credential``: a renewal keeps it."""
    from sdk.identity.datetimes import parse_datetime

    try:
        start = parse_datetime(credential["validFrom"]).timestamp()
        end = parse_datetime(credential["validUntil"]).timestamp()
    except (KeyError, IdentityError, ValueError, TypeError):
        return None
    return end - start if 1 <= end - start <= MAX_VALID_FOR else None


class Enrollment:
    """The lifecycle handlers of one coordinator (see :func:`register_enrollment`)."""

    def __init__(self, coordinator: Coordinator, settings: IssuerConfig | None = None) -> None:
        if coordinator.issuer is None:
            raise CoordinationError("enrollment needs a coordinator with an issuer key", reason="not_issuer")
        self.coordinator = coordinator
        self.issuer: Key = coordinator.issuer
        self.settings = settings or IssuerConfig()
        self.url = protocol.status_list_url(self.issuer.did)
        #: renewals per device: a small burst, then one every 5 s (each costs a signature)
        self.renew_limiter = SenderLimiter(rate=0.2, burst=3)

    # ------------------------------------------------------------------ helpers
    def _emit(self, what: str, **info: Any) -> None:
        self.coordinator._emit(what, **info)  # noqa: SLF001 - the coordinator's listener hook

    @property
    def store(self) -> Any:
        store = self.coordinator.store
        if store is None:
            raise CoordinationError("the coordinator is not started", reason="not_started")
        return store

    def own_indexes(self, status: Iterable[Mapping[str, Any]]) -> list[int]:
        """Indexes of the revocation entries in ``status`` that point at this issuer's list."""
        out = []
        for entry in status:
            if entry.get("statusListCredential") != self.url \
                    or entry.get("statusPurpose", "revocation") != "revocation":
                continue
            try:
                out.append(int(entry["statusListIndex"]))
            except (KeyError, TypeError, ValueError):
                continue
        return out

    def indexes_of(self, did: str) -> list[int]:
        """Every index of this issuer's list known to belong to ``did``: allocated by the store,
        seen in its admitted credential, or recorded in the offline-issuance ledger."""
        found = set(self.store.issued_indexes(did))
        rec = self.coordinator.registry.get(did)
        if rec is not None:
            found.update(self.own_indexes(rec.status))
        if self.settings.keystore is not None:
            try:
                ledger = StatusLedger(ledger_path(self.settings.keystore)).issued(self.issuer.did)
                found.update(i for i, row in ledger.items() if row.get("subject") == did)
            except StatusLedgerError as exc:
                log.warning("offline index ledger not consulted: %s", exc)
        return sorted(found)

    def _issue(self, did: str, *, kind: str, groups: Iterable[str], capabilities: Iterable[str] = (),
               name: str | None = None, valid_for: float | None = None,
               status: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A DeviceCredential valid from now for ``valid_for`` (so a device's renewal point is a true
        fraction of it), with ``status`` or a freshly allocated index of this issuer's list."""
        if status is None:
            index = self.store.allocate_coordinator_index(did, reserved=OFFLINE_RANGE)
            if index >= self.coordinator.status_list_size:
                raise CoordinationError("the status list is full", reason="status_list_full")
            status = status_entry(self.url, index)
        cred = device_credential(self.issuer, did, kind=kind, groups=groups, capabilities=capabilities,
                                 name=name, status=status, valid_from=datetime.now(UTC),
                                 valid_for=valid_for or self.settings.credential_valid_for)
        self._emit("issued", did=did, kind=kind, id=cred.get("id"))
        return cred

    def _issued_reply(self, request_id: str, credential: Mapping[str, Any]) -> dict[str, Any]:
        return {"status": "issued", "id": request_id, "credential": dict(credential),
                "renew_after": self.settings.renew_after}

    def _refuse(self, msg: Message, text: str, reason: str) -> EnrollmentRefused:
        log.warning("%s from %s refused: %s (%s)", msg.type, msg.sender, text, reason)
        self._emit("enroll_refused", did=msg.sender, type=msg.type, reason=reason)
        return EnrollmentRefused(text, reason=reason)

    def _known_revoked(self, did: str) -> bool:
        rec = self.coordinator.registry.get(did)
        return rec is not None and rec.state == REVOKED

    # ------------------------------------------------------------------ coord.enroll
    def on_enroll(self, msg: Message) -> dict[str, Any]:
        body = msg.body if isinstance(msg.body, dict) else {}
        if self._known_revoked(msg.sender):
            raise self._refuse(msg, f"{msg.sender} is revoked", "revoked")
        if "poll" in body:
            return self._poll(msg, body["poll"])
        if "token" in body:
            return self._enroll_token(msg, body["token"])
        if "vp" in body:
            return self._enroll_manufacturer(msg, body)
        raise self._refuse(msg, "enroll needs a token, a manufacturer presentation or a request id", "malformed")

    def _poll(self, msg: Message, request_id: Any) -> dict[str, Any]:
        rows = self.store.enroll_requests(request_id=request_id) if isinstance(request_id, str) else []
        if not rows or rows[0]["did"] != msg.sender:
            raise self._refuse(msg, "no such enrollment request for this DID", "not_found")
        row = rows[0]
        if row["state"] == "issued" and row["credential"] is not None:
            return self._issued_reply(row["id"], row["credential"])
        if row["state"] == "denied":
            raise self._refuse(msg, "the enrollment request was denied", "denied")
        return {"status": "pending", "id": row["id"]}

    def _existing(self, did: str, via: str) -> dict[str, Any] | None:
        """A repeated request (its reply lost): the same answer again, without a second use."""
        for row in self.store.enroll_requests(did=did):
            if row["via"] == via:
                if row["state"] == "issued" and row["credential"] is not None:
                    return self._issued_reply(row["id"], row["credential"])
                if row["state"] == "pending":
                    return {"status": "pending", "id": row["id"]}
        return None

    def _enroll_token(self, msg: Message, token: Any) -> dict[str, Any]:
        if not isinstance(token, str) or not 16 <= len(token) <= 256:
            raise self._refuse(msg, "unknown enrollment token", "not_authorized")
        digest = token_hash(token)
        via = f"token:{digest[:16]}"
        again = self._existing(msg.sender, via)
        if again is not None:
            return again
        outcome, info = self.store.use_enroll_token(digest)
        if outcome == "unknown" or info is None:
            raise self._refuse(msg, "unknown enrollment token", "not_authorized")
        if outcome == "used":
            raise self._refuse(msg, "this enrollment token is used up", "token_used")
        if outcome == "expired":
            raise self._refuse(msg, "this enrollment token expired", "token_expired")
        return self._admit_request(msg.sender, kind=info["kind"], groups=info["groups"], via=via,
                                   approve=info["approve"], valid_for=info["valid_for"])

    def _enroll_manufacturer(self, msg: Message, body: Mapping[str, Any]) -> dict[str, Any]:
        c = self.coordinator
        c.challenges.consume(body.get("challenge"), msg.sender)
        admitted = check_presentation(body.get("vp"), challenge=body["challenge"], domain=c.did, trust=c.trust,
                                      status=c.checker, credential_type=MANUFACTURER_CREDENTIAL,
                                      expected_holder=msg.sender)
        subject = admitted.subject
        kind = subject.get("kind") if isinstance(subject.get("kind"), str) else "device"
        raw_caps = subject.get("capabilities")
        caps: list[Any] = raw_caps if isinstance(raw_caps, list) else []
        via = f"manufacturer:{admitted.issuer}:{admitted.credential_id or ''}"[:256]
        again = self._existing(msg.sender, via)
        if again is not None:
            return again
        return self._admit_request(msg.sender, kind=str(kind)[:_MAX_NAME], groups=(), via=via,
                                   approve=self.settings.manufacturer_approve,
                                   capabilities=[x for x in caps if isinstance(x, str)][:256])

    def _admit_request(self, did: str, *, kind: str, groups: Iterable[str], via: str, approve: str,
                       valid_for: float | None = None, capabilities: Iterable[str] = ()) -> dict[str, Any]:
        request_id = "enr_" + secrets.token_hex(8)
        groups = list(groups)
        if approve == "auto":
            cred = self._issue(did, kind=kind, groups=groups, capabilities=capabilities, valid_for=valid_for)
            self.store.add_enroll_request(request_id, did=did, kind=kind, groups=groups, via=via, state="issued",
                                          credential=cred)
            log.info("enrolled %s as %s (%s)", did, kind, via.partition(":")[0])
            self._emit("enrolled", did=did, kind=kind, id=request_id)
            return self._issued_reply(request_id, cred)
        self.store.add_enroll_request(request_id, did=did, kind=kind, groups=groups, via=via, state="pending")
        log.info("enrollment request %s from %s (%s) awaits approval", request_id, did, kind)
        self._emit("enroll_pending", did=did, kind=kind, id=request_id)
        return {"status": "pending", "id": request_id}

    # ------------------------------------------------------------------ coord.renew
    def on_renew(self, msg: Message) -> dict[str, Any]:
        rec = self.coordinator.registry.get(msg.sender)
        if rec is None or not rec.admitted or rec.session is None:
            raise self._refuse(msg, "renewal needs an admitted device", "not_admitted")
        if rec.issuer != self.issuer.did:
            raise self._refuse(msg, f"this coordinator did not issue {msg.sender}'s credential", "not_issuer")
        if not self.renew_limiter.allow(msg.sender):
            raise self._refuse(msg, "renewing too often", "busy")
        entries = [e for e in rec.status if self.own_indexes([e])]
        subject = rec.session.credential.get("credentialSubject")
        name = subject.get("name") if isinstance(subject, dict) else None
        # the SAME index, so revocation by DID still covers it; a credential issued without status
        # (offline, --no-status) gets a fresh index and so becomes revocable
        cred = self._issue(rec.did, kind=rec.kind, groups=rec.groups, capabilities=rec.capabilities,
                           name=name if isinstance(name, str) else None,
                           status=dict(entries[0]) if entries else None,
                           valid_for=_period(rec.session.credential) or self.settings.credential_valid_for)
        log.info("renewed the credential of %s (valid until %s)", rec.did, cred.get("validUntil"))
        self._emit("renewed", did=rec.did, id=cred.get("id"))
        return {"status": "issued", "credential": cred, "renew_after": self.settings.renew_after}

    # ------------------------------------------------------------------ coord.rotate
    async def on_rotate(self, msg: Message) -> dict[str, Any]:
        body = msg.body if isinstance(msg.body, dict) else {}
        old, challenge, proof = body.get("old"), body.get("challenge"), body.get("proof")
        if not isinstance(old, str) or not isinstance(proof, str) or len(proof) > 200:
            raise self._refuse(msg, "rotate needs old (a DID), challenge and proof", "malformed")
        self.coordinator.challenges.consume(challenge, msg.sender)
        assert isinstance(challenge, str)
        try:
            public = public_key_from_did_key(old)
            signature = b64url_decode(proof, max_len=200)
        except (IdentityError, ValueError) as exc:
            raise self._refuse(msg, f"bad rotation proof: {exc}", "bad_signature") from exc
        if not public.is_valid(signature, canonicalize(rotation_payload(msg.sender, self.coordinator.did,
                                                                        challenge))):
            raise self._refuse(msg, "the rotation proof is not the old key's signature", "bad_signature")
        if old == msg.sender:
            raise self._refuse(msg, "the new DID must differ from the old one", "malformed")
        rec = self.coordinator.registry.get(old)
        if rec is None:
            raise self._refuse(msg, f"{old} is not a known device", "not_found")
        if rec.state == REVOKED:
            raise self._refuse(msg, f"{old} is revoked", "revoked")
        if rec.issuer != self.issuer.did:
            raise self._refuse(msg, f"this coordinator did not issue {old}'s credential", "not_issuer")
        cred = self._issue(msg.sender, kind=rec.kind, groups=rec.groups, capabilities=rec.capabilities,
                           name=rec.name or None)
        indexes = self.indexes_of(old)
        if indexes:
            await self._revoke(old, indexes)
        self.store.record_revocation(old, reason=f"rotated to {msg.sender}", operator=None, indexes=indexes)
        log.info("key rotation: %s -> %s (old indexes %s revoked)", old, msg.sender, indexes)
        self._emit("rotated", old=old, new=msg.sender)
        return {"status": "issued", "credential": cred, "renew_after": self.settings.renew_after}

    async def _revoke(self, did: str, indexes: list[int]) -> bool:
        """Revoke ``indexes`` for ``did``; False when the list could not be published right now."""
        try:
            await self.coordinator.revoke(did, indexes=indexes)
        except MessagingError as exc:
            log.error("status list after revoking %s not published (%s); devices learn it on the next "
                      "publication", did, exc.reason)
            return False
        return True

    # ------------------------------------------------------------------ operator operations
    def op_token(self, req: OperatorRequest) -> dict[str, Any]:
        p = req.params
        kind = _param(p, "kind", str, required=True)
        if not 0 < len(kind) <= _MAX_NAME:
            raise OperatorError("parameter 'kind' must be 1-128 characters", reason="invalid_params")
        groups = _names(p.get("groups"), "groups")
        uses = _param(p, "uses", int, 1)
        if not 1 <= uses <= MAX_TOKEN_USES:
            raise OperatorError(f"parameter 'uses' must be 1..{MAX_TOKEN_USES}", reason="invalid_params")
        ttl = _number(p, "ttl", 3600.0, 1.0, MAX_TOKEN_TTL)
        approve = p.get("approve", "auto")
        if approve not in ("auto", "manual"):
            raise OperatorError("parameter 'approve' must be \"auto\" or \"manual\"", reason="invalid_params")
        valid_for = _number(p, "valid_for", self.settings.credential_valid_for, 1.0, MAX_VALID_FOR)
        token = "agt_" + secrets.token_urlsafe(24)
        expires = time.time() + ttl
        self.store.add_enroll_token(token_hash(token), kind=kind, groups=groups, uses=uses, expires=expires,
                                    approve=approve, valid_for=valid_for, operator=req.operator)
        log.info("enrollment token for %s %s (%d use(s), %s approval) made by %s", kind, groups, uses, approve,
                 req.operator)
        return {"token": token, "expires": expires}

    def op_pending(self, req: OperatorRequest) -> dict[str, Any]:
        rows = self.store.enroll_requests(state="pending")
        return {"requests": [{k: r[k] for k in ("id", "did", "kind", "groups", "at", "via")} for r in rows]}

    def _pending_request(self, req: OperatorRequest) -> dict[str, Any]:
        rid, did = req.params.get("id"), req.params.get("did")
        if (rid is None) == (did is None) or not isinstance(rid or did, str):
            raise OperatorError("give exactly one of 'id' or 'did'", reason="invalid_params")
        rows = self.store.enroll_requests(request_id=rid, did=did, state="pending")
        if not rows:
            raise OperatorError(f"no pending enrollment request {rid or did}", reason="not_found")
        return dict(rows[0])

    def op_approve(self, req: OperatorRequest) -> dict[str, Any]:
        row = self._pending_request(req)
        cred = self._issue(row["did"], kind=row["kind"], groups=row["groups"])
        self.store.set_enroll_request(row["id"], state="issued", credential=cred)
        log.info("enrollment request %s of %s approved by %s", row["id"], row["did"], req.operator)
        self._emit("enrolled", did=row["did"], kind=row["kind"], id=row["id"])
        return {"did": row["did"], "id": row["id"], "approved": True}

    def op_deny(self, req: OperatorRequest) -> dict[str, Any]:
        row = self._pending_request(req)
        self.store.set_enroll_request(row["id"], state="denied")
        log.info("enrollment request %s of %s denied by %s", row["id"], row["did"], req.operator)
        return {"did": row["did"], "id": row["id"], "denied": True}

    async def op_revoke(self, req: OperatorRequest) -> dict[str, Any]:
        did = _param(req.params, "did", str, required=True)
        reason = _param(req.params, "reason", str, "unspecified")
        if len(reason) > 256:
            raise OperatorError("parameter 'reason' must be at most 256 characters", reason="invalid_params")
        indexes = self.indexes_of(did)
        if not indexes:
            raise OperatorError(f"no credential of {did} on this issuer's status list is known",
                                reason="not_found")
        published = await self._revoke(did, indexes)
        self.store.record_revocation(did, reason=reason, operator=req.operator, indexes=indexes)
        log.warning("device %s revoked by %s: %s (indexes %s)", did, req.operator, reason, indexes)
        return {"did": did, "revoked": indexes, "published": published}


def register_enrollment(coordinator: Coordinator, settings: IssuerConfig | None = None) -> Enrollment:
    """Serve ``coord.enroll`` / ``coord.renew`` / ``coord.rotate`` and register the lifecycle
    operator operations on ``coordinator`` (which must have an issuer key)."""
    enrollment = Enrollment(coordinator, settings)
    coordinator.register_command(protocol.ENROLL, enrollment.on_enroll)
    coordinator.register_command(protocol.RENEW, enrollment.on_renew)
    coordinator.register_command(protocol.ROTATE, enrollment.on_rotate)
    ops = coordinator.operations
    ops.register("enroll.token", "admin", enrollment.op_token)
    ops.register("enroll.pending", "admin", enrollment.op_pending)
    ops.register("enroll.approve", "admin", enrollment.op_approve)
    ops.register("enroll.deny", "admin", enrollment.op_deny)
    ops.register("device.revoke", "admin", enrollment.op_revoke)
    return enrollment


__all__ = ["Enrollment", "EnrollmentRefused", "MANUFACTURER_CREDENTIAL", "load_issuer_key", "register_enrollment",
           "rotation_payload", "token_hash"]
