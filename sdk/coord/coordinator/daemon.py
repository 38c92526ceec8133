"""The coordinator daemon: admits devices, runs rules on their events, pushes signed configs.

Everything goes through one :class:`~sdk.messaging.client.SecureClient` (signed envelopes). The
order of work per event: verify sender and admission → rules → commit the new desired versions
to SQLite → publish each target's missing versions in order (one pump per device) → count
reports into the convergence metrics. A restart reloads the store; devices see the new
``boot`` in the coordinator's retained presence, re-authenticate stating their last version,
and the pump sends what they missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sdk.coord import protocol
from sdk.coord.coordinator.auth import (
    COORDINATOR_CREDENTIAL,
    RESUME_TTL,
    Challenges,
    check_presentation,
    coordinator_credential,
    device_credential,
    present,
)
from sdk.coord.coordinator.config import CoordinatorConfig
from sdk.coord.coordinator.errors import AdmissionError, CoordinationError
from sdk.coord.coordinator.metrics import CoordinatorMetrics
from sdk.coord.coordinator.registry import EXPIRED, OFFLINE, ONLINE, REVOKED, DeviceRecord, Registry
from sdk.coord.coordinator.rules import RuleSet
from sdk.coord.coordinator.store import ConfigVersion, Store
from sdk.coord.events import Event, InvalidEvent
from sdk.identity import (
    IdentityError,
    Key,
    StatusChecker,
    StatusList,
    TrustPolicy,
    create_status_list_credential,
    status_entry,
)
from sdk.messaging.broker_auth import did_credentials
from sdk.messaging.client import ClientConfig, SecureClient
from sdk.messaging.envelope import Message, Signer
from sdk.messaging.errors import MessagingError
from sdk.messaging.status import MqttStatusListSource, publish_status_list
from sdk.messaging.transport import Will

log = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], Any]
STATUS_LIST_SIZE = 131072


class Coordinator:
    """One coordinator: ``await c.start()`` ... ``await c.stop()`` (or ``async with``)."""

    def __init__(
        self,
        key: Key,
        *,
        broker: str,
        data_dir: str | Path,
        trust: TrustPolicy,
        rules: RuleSet | None = None,
        credential: dict[str, Any] | str | None = None,
        issuer: Key | None = None,
        heartbeat_ttl: float = 30.0,
        durability: str = "normal",
        sweep_interval: float = 1.0,
        metrics_port: int = 0,
        client_config: ClientConfig | None = None,
        **transport_options: Any,
    ) -> None:
        self.key = key
        self.did = key.did
        self.broker = broker
        self.data_dir = Path(data_dir)
        self.issuer = issuer
        self.trust = trust.allow(issuer.did, "DeviceCredential") if issuer is not None else trust
        self.rules = rules or RuleSet()
        if credential is None:
            if issuer is None:
                raise ValueError("give the coordinator a credential, or an issuer key to self-issue one")
            credential = coordinator_credential(issuer, self.did)
        self.credential = credential
        self.heartbeat_ttl = heartbeat_ttl
        self.durability = durability
        self.sweep_interval = sweep_interval
        self.metrics_port = metrics_port
        self.boot = secrets.token_hex(8)
        self.registry = Registry()
        self.metrics = CoordinatorMetrics()
        self.challenges = Challenges()
        self.status_source = MqttStatusListSource()
        self.checker = StatusChecker(self.status_source)
        self.status_source.add_listener(self._on_status_list)
        self.store: Store | None = None
        self._token = protocol.token(self.did)
        presence = protocol.device_presence(self._token)
        _, will = Signer(key).seal(presence, {"state": "offline", "boot": self.boot}, type=protocol.PRESENCE,
                                   ttl=365 * 86400)
        options = {**did_credentials(key), **transport_options}
        options.setdefault("will", Will(presence, will, qos=1, retain=True))
        self.client = SecureClient(broker, key, config=client_config or ClientConfig(qos=0), **options)
        self._credentials: dict[str, dict[str, Any]] = {}
        self._reports: list[tuple[str, int, str, str | None, float | None]] = []
        self._persisted: dict[str, str] = {}
        self._sent: dict[str, int] = {}
        self._gen: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[Listener] = []
        self._notified: dict[str, float] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._http: Any = None
        self._issuer_state: dict[str, Any] = {}
        self._status_list: StatusList | None = None
        self._dirty = True
        self.started = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: CoordinatorConfig, *, key: Key | None = None, broker: str | None = None,
                    issuer: Key | None = None, **kwargs: Any) -> Coordinator:
        """Build from a loaded :class:`CoordinatorConfig` (key from the keystore unless given)."""
        key = key or load_key(config)
        credential = None
        if config.credential is not None:
            try:
                text = config.credential.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise CoordinationError(f"cannot read coordinator credential {config.credential}: {exc}",
                                        reason="invalid_config_file") from exc
            credential = text if not text.startswith("{") else json.loads(text)
        trust = TrustPolicy({t.issuer: set(t.types) for t in config.trust})
        return cls(key, broker=broker or config.broker, data_dir=config.data_dir, trust=trust,
                   rules=config.rules, credential=credential, issuer=issuer,
                   heartbeat_ttl=config.heartbeat_ttl, durability=config.durability,
                   sweep_interval=config.sweep_interval, metrics_port=config.metrics_port, **kwargs)

    async def __aenter__(self) -> Coordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def add_listener(self, listener: Listener) -> None:
        """``listener(what, info)``: admitted, refused, event, committed, report, converged, revoked,
        expired, offline, rejected."""
        self._listeners.append(listener)

    def _emit(self, what: str, /, **info: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(what, info)
            except Exception:  # noqa: BLE001
                log.exception("coordinator listener failed on %s", what)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Open the store, connect, subscribe, announce presence and status lists."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.data_dir / "coordinator.db", durability=self.durability)
        for row in self.store.load_devices():
            rec = DeviceRecord(did=row["did"], kind=row.get("kind", "device"), name=row.get("name", ""),
                               groups=frozenset(row.get("groups", ())),
                               capabilities=frozenset(row.get("capabilities", ())),
                               attributes=dict(row.get("attributes", {})),
                               credential_id=row.get("credential_id"), issuer=row.get("issuer"),
                               state=REVOKED if row.get("state") == REVOKED else OFFLINE,
                               last_seen=row.get("last_seen", 0.0), first_seen=row.get("first_seen", 0.0),
                               heartbeat_ttl=row.get("heartbeat_ttl", self.heartbeat_ttl))
            self.registry.put(rec)
        if self.issuer is not None:
            self._load_issuer_state()
        await self.client.connect()
        await self.status_source.attach(self.client)
        await self.client.serve(protocol.device_commands(self._token), self._on_command, qos=1)
        await self.client.subscribe(protocol.ALL_EVENTS, self._on_device_message, qos=1)
        await self.client.subscribe(protocol.ALL_PRESENCE, self._on_presence, qos=1)
        self.client.transport.add_on_connect(self._on_reconnect)
        await self._announce()
        self._sweeper = asyncio.ensure_future(self._sweep_loop())
        if self.metrics_port:
            from prometheus_client import start_http_server
            self._http = start_http_server(self.metrics_port, addr="127.0.0.1", registry=self.metrics.registry)
        self.started = True
        log.info("coordinator %s up (boot %s, %d known devices, %d rules)", self.did, self.boot,
                 len(self.registry), len(self.rules))

    async def stop(self) -> None:
        """Say offline (retained), stop tasks, close the store."""
        if not self.started:
            return
        self.started = False
        with contextlib.suppress(MessagingError, OSError):
            if self.client.connected:
                await self.client.publish(protocol.device_presence(self._token),
                                          {"state": "offline", "boot": self.boot}, type=protocol.PRESENCE,
                                          retain=True, qos=1)
        for task in [self._sweeper, *self._tasks]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._http is not None:
            with contextlib.suppress(Exception):
                self._http[0].shutdown()
                self._http[0].server_close()
        self._write_status()
        await self.client.aclose()
        if self.store is not None:
            self.store.save_devices(r.to_row() for r in self.registry)
            self.store.close()

    async def _announce(self) -> None:
        await self.client.publish(protocol.device_presence(self._token), {"state": "online", "boot": self.boot},
                                  type=protocol.PRESENCE, retain=True, qos=1)
        if self.issuer is not None and self._issuer_state.get("credential") is not None:
            await self._publish_status_list()

    def _on_reconnect(self, session_present: bool) -> None:
        if self.started:
            self._spawn(self._announce())

    def _spawn(self, aw: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("coordinator task failed", exc_info=task.exception())

    # ------------------------------------------------------------------ authentication
    async def _on_command(self, msg: Message) -> Any:
        try:
            if msg.type == protocol.HELLO:
                return self._hello(msg)
            if msg.type == protocol.PRESENT:
                return self._present(msg)
        except AdmissionError as exc:
            self.metrics.auth.labels(exc.reason).inc()
            log.warning("admission refused for %s: %s: %s", msg.sender, exc.reason, exc)
            self._emit("refused", did=msg.sender, reason=exc.reason, message=str(exc))
            raise MessagingError(str(exc), reason=exc.reason) from exc
        raise MessagingError(f"unknown command {msg.type!r}", reason="unknown_command")

    def _hello(self, msg: Message) -> dict[str, Any]:
        body = msg.body if isinstance(msg.body, dict) else {}
        nonce = body.get("nonce")
        if not isinstance(nonce, str) or not 8 <= len(nonce) <= 128:
            raise AdmissionError("hello needs a nonce of 8-128 characters", reason="malformed")
        vp = present(self.credential, self.key, challenge=nonce, domain=msg.sender)
        return {"challenge": self.challenges.issue(msg.sender), "vp": vp, "boot": self.boot,
                "heartbeat_ttl": self.heartbeat_ttl}

    def _present(self, msg: Message) -> dict[str, Any]:
        assert self.store is not None
        body = msg.body if isinstance(msg.body, dict) else {}
        self.challenges.consume(body.get("challenge"), msg.sender)
        admitted = check_presentation(body.get("vp"), challenge=body["challenge"], domain=self.did,
                                      trust=self.trust, status=self.checker, expected_holder=msg.sender)
        did = admitted.holder
        last = body.get("last_version", 0)
        if isinstance(last, bool) or not isinstance(last, int) or last < 0:
            raise AdmissionError("last_version must be a non-negative integer", reason="malformed")
        ttl = body.get("heartbeat_ttl", self.heartbeat_ttl)
        ttl = float(ttl) if isinstance(ttl, (int, float)) and not isinstance(ttl, bool) else self.heartbeat_ttl
        ttl = min(max(ttl, 0.1), 3600.0)
        session = secrets.token_hex(8)
        rec = self.registry.register(did, admitted.subject, credential_id=admitted.credential_id,
                                     issuer=admitted.issuer, session=session, heartbeat_ttl=ttl)
        if "capabilities" in body or "attributes" in body:
            caps = body.get("capabilities")
            attrs = body.get("attributes")
            self.registry.announce(did, capabilities=caps if isinstance(caps, list) else None,
                                   attributes=attrs if isinstance(attrs, dict) else None)
        self._credentials[did] = admitted.credential
        self._persist(rec)
        latest = self.store.latest_version(did)
        self._sent[did] = min(last, latest)
        self._gen[did] = self._gen.get(did, 0) + 1      # a pump of the previous session stops
        self.metrics.auth.labels("admitted").inc()
        self._dirty = True
        self._emit("admitted", did=did, kind=rec.kind, last_version=last, latest=latest)
        if latest > last:
            asyncio.get_running_loop().call_soon(lambda: self._spawn(self._pump(did)))
        reply = {"session": session, "boot": self.boot, "heartbeat_ttl": ttl, "pending": max(0, latest - last),
                 "next_challenge": self.challenges.issue(did, ttl=RESUME_TTL)}
        nonce = body.get("nonce")
        if isinstance(nonce, str) and 8 <= len(nonce) <= 128:   # resumed: prove ourselves in the reply
            reply["vp"] = present(self.credential, self.key, challenge=nonce, domain=did)
        return reply

    def _persist(self, rec: DeviceRecord) -> None:
        """Save a device record unless only its liveness fields changed since the last save."""
        assert self.store is not None
        row = rec.to_row()
        stable = json.dumps({k: v for k, v in row.items() if k not in ("last_seen",)}, sort_keys=True,
                            default=str)
        if self._persisted.get(rec.did) != stable:
            self.store.save_devices([row])
            self._persisted[rec.did] = stable

    # ------------------------------------------------------------------ device messages
    def _check_sender(self, msg: Message, kind: str) -> DeviceRecord | None:
        parsed = protocol.parse_device_topic(msg.topic)
        if parsed is None or parsed[1] != kind:
            return None
        if msg.sender == self.did:
            return None
        if parsed[0] != protocol.token(msg.sender):
            self._reject(msg, "wrong_topic_owner")
            return None
        rec = self.registry.get(msg.sender)
        if rec is None or not rec.admitted:
            reason = REVOKED if rec is not None and rec.state == REVOKED else "not_admitted"
            self._reject(msg, reason)
            self._notify(msg.sender, protocol.NOTICE_REVOKED if reason == REVOKED else protocol.NOTICE_REAUTH,
                         reason)
            return None
        rec.last_seen = time.time()
        return rec

    def _reject(self, msg: Message, reason: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        log.warning("rejected %s from %s on %s: %s", msg.type, msg.sender, msg.topic, reason)
        self._emit("rejected", did=msg.sender, type=msg.type, reason=reason)

    def _notify(self, did: str, notice: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._notified.get(did, 0.0) < 0.5:   # at most two notices a second per device
            return
        self._notified[did] = now
        self._spawn(self._send_notice(did, notice, reason))

    async def _send_notice(self, did: str, notice: str, reason: str) -> None:
        with contextlib.suppress(MessagingError):
            await self.client.publish(protocol.device_commands(protocol.token(did)),
                                      {"notice": notice, "reason": reason}, type=protocol.NOTICE, qos=1)

    async def _on_device_message(self, msg: Message) -> None:
        rec = self._check_sender(msg, "events")
        if rec is None:
            return
        if msg.type == protocol.EVENT:
            await self._handle_event(msg)
        elif msg.type == protocol.REPORT:
            self._handle_report(msg)
        elif msg.type == protocol.ANNOUNCE:
            body = msg.body if isinstance(msg.body, dict) else {}
            caps, attrs = body.get("capabilities"), body.get("attributes")
            self.registry.announce(msg.sender, capabilities=caps if isinstance(caps, list) else None,
                                   attributes=attrs if isinstance(attrs, dict) else None)
            self._dirty = True
        else:
            self._reject(msg, "unknown_type")

    async def _handle_event(self, msg: Message) -> None:
        assert self.store is not None
        t0 = time.perf_counter()
        event_id = _event_id(msg)
        if self.store.event_processed(msg.sender, event_id):
            log.info("event %s from %s already processed; acknowledged again", event_id, msg.sender)
            self._emit("duplicate", did=msg.sender, event_id=event_id)
            self._ack(msg.sender, event_id, protocol.ACK_DUPLICATE)
            return
        try:
            event = Event.from_body(msg.body)
        except InvalidEvent as exc:
            log.warning("invalid event from %s: %s", msg.sender, exc)
            self._reject(msg, exc.reason)
            self._ack(msg.sender, event_id, protocol.ACK_REJECTED, exc.reason)   # no point re-sending it
            return
        actions = self.rules.evaluate(event, msg.sender, self.registry)
        merged: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {}
        for action in actions:
            for did in action.targets:
                changes, rules = merged.get(did, ({}, ()))
                merged[did] = ({**changes, **action.changes}, (*rules, action.rule))
        try:
            versions = self.store.commit(merged, event_id=event_id,
                                         event=(msg.sender, event.type, event.fields))
        except CoordinationError as exc:       # not acknowledged: the device sends it again
            log.error("event %s from %s not committed: %s", event_id, msg.sender, exc)
            return
        if merged and not versions:            # processed meanwhile (dedup inside the transaction)
            self._ack(msg.sender, event_id, protocol.ACK_DUPLICATE)
            return
        self.metrics.events.labels(event.type).inc()
        self._emit("event", did=msg.sender, event_id=event_id, type=event.type, fields=event.fields,
                   targets=sorted(merged))
        if not merged:
            self._ack(msg.sender, event_id, protocol.ACK_PROCESSED)
            return
        self.metrics.start(event_id, {c.did: c.version for c in versions})
        self._dirty = True
        self.metrics.event_work(time.perf_counter() - t0)        # rules + durable commit
        self._emit("committed", event_id=event_id, versions={c.did: c.version for c in versions})
        await asyncio.gather(*(self._pump(c.did, c) for c in versions))
        self._ack(msg.sender, event_id, protocol.ACK_PROCESSED)

    def _ack(self, did: str, event_id: str, status: str, reason: str | None = None) -> None:
        """Tell ``did`` its event is durably handled, so it drops it from its outbox."""
        body: dict[str, Any] = {"event_id": event_id, "status": status}
        if reason:
            body["reason"] = reason
        self._spawn(self._send_ack(did, body))

    async def _send_ack(self, did: str, body: dict[str, Any]) -> None:
        try:
            await self.client.publish(protocol.device_commands(protocol.token(did)), body,
                                      type=protocol.EVENT_ACK, qos=1)
        except MessagingError as exc:          # the device re-sends; dedup answers it again
            log.info("event ack to %s not sent: %s", did, exc.reason)

    def _handle_report(self, msg: Message) -> None:
        assert self.store is not None
        body = msg.body if isinstance(msg.body, dict) else {}
        version, status = body.get("version"), body.get("status")
        if isinstance(version, bool) or not isinstance(version, int) or status not in (protocol.APPLIED,
                                                                                       protocol.FAILED):
            self._reject(msg, "malformed")
            return
        if version > self.store.latest_version(msg.sender):
            self._reject(msg, "unknown_version")
            return
        reason = body.get("reason") if isinstance(body.get("reason"), str) else None
        apply_ms = body.get("apply_ms") if isinstance(body.get("apply_ms"), (int, float)) else None
        self._reports.append((msg.sender, version, status, reason, apply_ms))
        if len(self._reports) == 1:     # one transaction for every report read in this loop turn
            asyncio.get_running_loop().call_soon(self._flush_reports)

    def _flush_reports(self) -> None:
        assert self.store is not None
        batch, self._reports = self._reports, []
        try:
            self.store.record_reports(batch)
        except CoordinationError as exc:
            log.error("could not record %d report(s): %s", len(batch), exc)
            return
        self._dirty = True
        for did, version, status, reason, apply_ms in batch:
            done = self.metrics.report(did, version, status, apply_ms=apply_ms)
            self._emit("report", did=did, version=version, status=status, reason=reason)
            if done is not None:
                event_id, seconds, targets, failures = done
                self.store.mark_converged(event_id, failures=failures)
                log.info("event %s converged in %.3f ms over %d device(s), %d failure(s)", event_id,
                         seconds * 1000, targets, failures)
                self._emit("converged", event_id=event_id, seconds=seconds, targets=targets,
                           failures=failures)

    def _on_presence(self, msg: Message) -> None:
        parsed = protocol.parse_device_topic(msg.topic)
        if parsed is None or msg.sender == self.did or parsed[0] != protocol.token(msg.sender):
            return
        rec = self.registry.get(msg.sender)
        if rec is None:
            return
        body = msg.body if isinstance(msg.body, dict) else {}
        if msg.type == protocol.HEARTBEAT:
            if rec.admitted:
                rec.last_seen = time.time()
            elif rec.state != REVOKED and not msg.retained:
                self._notify(msg.sender, protocol.NOTICE_REAUTH, "not_admitted")
        elif msg.type == protocol.PRESENCE and body.get("state") == "offline" and rec.admitted \
                and not msg.retained:
            self.registry.set_state(msg.sender, OFFLINE)
            self._sent.pop(msg.sender, None)
            self._dirty = True
            log.info("device %s offline (%s)", msg.sender, body.get("reason", "?"))
            self._emit("offline", did=msg.sender, reason=body.get("reason"))

    # ------------------------------------------------------------------ config push
    async def _pump(self, did: str, known: ConfigVersion | None = None) -> None:
        """Send ``did`` every committed version it has not been sent, in order (one pump per device)."""
        assert self.store is not None
        lock = self._locks.get(did)
        if lock is None:
            lock = self._locks[did] = asyncio.Lock()
        async with lock:
            while True:
                rec = self.registry.get(did)
                if rec is None or not rec.admitted or did not in self._sent:
                    return
                sent, gen = self._sent[did], self._gen.get(did)
                if sent >= self.store.latest_version(did):
                    return
                if known is not None and known.version == sent + 1:
                    batch = [known]
                else:
                    batch = self.store.versions_since(did, sent)
                known = None
                for cv in batch:
                    body = cv.to_body()
                    try:
                        await self.client.publish(protocol.device_config(protocol.token(did)), body,
                                                  type=protocol.CONFIG, qos=1)
                    except MessagingError as exc:
                        log.warning("config v%d to %s not sent (%s); it goes out on reconnect",
                                    cv.version, did, exc.reason)
                        self._sent.pop(did, None)
                        return
                    if self._sent.get(did) is None or self._gen.get(did) != gen:
                        return          # offline, expired, or re-admitted meanwhile (its own pump follows)
                    self._sent[did] = cv.version
                    self.metrics.config_sent(len(json.dumps(body, separators=(",", ":"))))

    # ------------------------------------------------------------------ revocation
    def _on_status_list(self, url: str, credential: Any) -> None:
        try:
            self.checker.update(url, credential)
        except IdentityError as exc:
            log.warning("status list %s rejected: %s", url, exc)
            return
        for did, cred in list(self._credentials.items()):
            status = cred.get("credentialStatus")
            if status is None:
                continue
            entries = status if isinstance(status, list) else [status]
            if not any(isinstance(e, dict) and e.get("statusListCredential") == url for e in entries):
                continue
            rec = self.registry.get(did)
            if rec is None or rec.state == REVOKED:
                continue
            try:
                self.checker.check(status, issuer=rec.issuer)
            except IdentityError as exc:
                if exc.reason in ("revoked", "suspended"):
                    self._revoke_session(did, exc.reason)

    def _revoke_session(self, did: str, reason: str) -> None:
        assert self.store is not None
        rec = self.registry.set_state(did, REVOKED)
        self._sent.pop(did, None)
        self._credentials.pop(did, None)
        if rec is not None:
            self._persist(rec)
        self._dirty = True
        log.warning("device %s %s: disconnected from coordination", did, reason)
        self._notified.pop(did, None)
        self._notify(did, protocol.NOTICE_REVOKED, reason)
        self._emit("revoked", did=did, reason=reason)

    # -- the coordinator as an issuer (demo, small deployments)
    def _issuer_path(self) -> Path:
        return self.data_dir / "issuer-state.json"

    def _load_issuer_state(self) -> None:
        assert self.issuer is not None
        path = self._issuer_path()
        state: dict[str, Any] = {"next_index": 0, "by_did": {}, "revoked": []}
        if path.exists():
            state = json.loads(path.read_text(encoding="utf-8"))
        self._issuer_state = state
        self._status_list = StatusList(STATUS_LIST_SIZE)
        for index in state["revoked"]:
            self._status_list.set(index)
        self._resign_status_list()

    def _save_issuer_state(self) -> None:
        path = self._issuer_path()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v for k, v in self._issuer_state.items() if k != "credential"}))
        os.replace(tmp, path)

    def _resign_status_list(self) -> None:
        assert self.issuer is not None and self._status_list is not None
        url = protocol.status_list_url(self.issuer.did)
        cred = create_status_list_credential(self.issuer, url, status_list=self._status_list)
        self._issuer_state["credential"] = cred
        self.status_source.put(url, cred)

    async def _publish_status_list(self) -> None:
        assert self.issuer is not None
        await publish_status_list(self.client, self._issuer_state["credential"])

    def issue_device_credential(self, did: str, *, kind: str, groups: Iterable[str] = (),
                                capabilities: Iterable[str] = (), name: str | None = None,
                                valid_for: float = 365 * 86400) -> dict[str, Any]:
        """Issue a revocable DeviceCredential with the coordinator's issuer key."""
        if self.issuer is None:
            raise CoordinationError("this coordinator has no issuer key", reason="not_issuer")
        if not self._issuer_state:
            self._load_issuer_state()
        index = int(self._issuer_state["next_index"])
        self._issuer_state["next_index"] = index + 1
        self._issuer_state["by_did"].setdefault(did, []).append(index)
        self._save_issuer_state()
        entry = status_entry(protocol.status_list_url(self.issuer.did), index)
        return device_credential(self.issuer, did, kind=kind, groups=groups, capabilities=capabilities,
                                 name=name, status=entry, valid_for=valid_for)

    async def revoke(self, did: str) -> None:
        """Revoke every credential this coordinator issued to ``did``: update, publish, disconnect."""
        if self.issuer is None or self._status_list is None:
            raise CoordinationError("this coordinator has no issuer key", reason="not_issuer")
        indexes = self._issuer_state["by_did"].get(did, [])
        if not indexes:
            raise CoordinationError(f"no credential issued to {did}", reason="unknown_device")
        for index in indexes:
            self._status_list.set(index)
            if index not in self._issuer_state["revoked"]:
                self._issuer_state["revoked"].append(index)
        self._save_issuer_state()
        self._resign_status_list()          # listeners apply it locally at once
        await self._publish_status_list()

    # ------------------------------------------------------------------ expiry and status
    async def _sweep_loop(self) -> None:
        last_write = 0.0
        while True:
            await asyncio.sleep(self.sweep_interval)
            self.sweep()
            now = time.monotonic()
            if self._dirty and now - last_write >= 1.0:
                last_write = now
                self._write_status()

    def sweep(self, now: float | None = None) -> list[str]:
        """Expire devices whose heartbeat TTL lapsed; returns their DIDs."""
        expired = []
        for rec in self.registry.expired(now):
            self.registry.set_state(rec.did, EXPIRED)
            self._sent.pop(rec.did, None)
            expired.append(rec.did)
            log.info("device %s expired (no heartbeat for %.1fs)", rec.did, rec.heartbeat_ttl)
            self._emit("expired", did=rec.did)
        if expired and self.store is not None:
            self.store.save_devices(r.to_row() for r in self.registry if r.did in expired)
            self._dirty = True
        self.challenges.sweep()
        counts: dict[str, int] = {}
        for rec in self.registry:
            counts[rec.state] = counts.get(rec.state, 0) + 1
        for state in (ONLINE, OFFLINE, EXPIRED, REVOKED):
            self.metrics.devices.labels(state).set(counts.get(state, 0))
        return expired

    def status(self) -> dict[str, Any]:
        """Devices (with desired/reported versions and delta) and adaptation metrics."""
        devices = []
        for rec in sorted(self.registry, key=lambda r: (r.kind, r.did)):
            row = rec.to_row()
            if self.store is not None:
                rep = self.store.reported(rec.did)
                row.update(desired_version=self.store.latest_version(rec.did), reported_version=rep.version,
                           report_status=rep.status, delta=self.store.delta(rec.did))
            devices.append(row)
        return {"coordinator": self.did, "boot": self.boot, "broker": self.broker, "updated": time.time(),
                "devices": devices, "metrics": self.metrics.summary()}

    def _write_status(self) -> None:
        self._dirty = False
        try:
            path = self.data_dir / "status.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.status(), indent=1, default=str))
            os.replace(tmp, path)
        except (OSError, CoordinationError) as exc:
            log.warning("could not write status snapshot: %s", exc)


def _event_id(msg: Message) -> str:
    """The event's id: the body's ``event_id`` (kept across a device's re-sends), else the envelope id."""
    body = msg.body if isinstance(msg.body, dict) else {}
    eid = body.get("event_id")
    if isinstance(eid, str) and 8 <= len(eid) <= 128:
        return eid
    return msg.id


def load_key(config: CoordinatorConfig) -> Key:
    """The coordinator's key: ``identity.key``, else the keystore (passphrase from the env)."""
    if config.key_multibase:
        return Key.from_multibase(config.key_multibase)
    if config.keystore is None:
        raise CoordinationError("no identity: set [identity] keystore or key", reason="invalid_config_file")
    from sdk.identity.keystore import Keystore

    passphrase = os.environ.get(config.passphrase_env)
    if passphrase is None:
        raise CoordinationError(f"set ${config.passphrase_env} to the keystore passphrase",
                                reason="invalid_config_file")
    return Keystore.open(config.keystore, passphrase).key


__all__ = ["Coordinator", "load_key", "COORDINATOR_CREDENTIAL"]
