"""Device SDK: authenticate to the coordinator, announce presence, publish events, apply configs.

    async with Device(key, credential, broker=url, coordinator=coord_did, on_config=apply) as dev:
        await dev.publish_event(events.screen_available(800, 600, density=160))

* Mutual authentication (DID + VP): the device sends a nonce and checks the coordinator's
  CoordinatorCredential presentation over it, then answers the coordinator's fresh challenge
  with a presentation of its DeviceCredential. Failure raises :class:`AdmissionError` (reason:
  untrusted_issuer, revoked, expired, wrong_challenge, untrusted_coordinator, timeout...).
* Presence: retained online/offline on the device's presence topic (a will covers unclean
  disconnects) and heartbeats every ``heartbeat_ttl / 3`` (the coordinator expires silence; the
  TTL is the coordinator's configured one, default 30 s, unless the device asks for its own).
* Configs: versioned, signed by the coordinator (checked: sender DID, device, version) before
  the app sees them, through ``on_config`` (return = applied, raise = failed) or
  ``async for cfg in dev.configs()`` (``await cfg.ack()`` / ``await cfg.fail(reason)``).
* Catch-up: every (re)authentication states the last version handled; the coordinator sends
  what changed since, and each version reaches the app exactly once.
* Outbox: each event carries an ``event_id`` and stays queued (in ``state_file`` too) until the
  coordinator acknowledges it (``coord.event_ack``); unacknowledged events are re-sent in order
  after every (re)admission and every heartbeat TTL, and the coordinator applies each id once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdk.coord import protocol
from sdk.coord.errors import AdmissionError, ConfigRejected, NotAdmitted
from sdk.coord.handshake import COORDINATOR_CREDENTIAL, check_presentation, present
from sdk.coord.protocol import ConfigVersion
from sdk.coord.events import Event, battery, custom, input_methods, network, screen_available, screen_lost
from sdk.identity import Key, StatusChecker, TrustPolicy
from sdk.messaging.broker_auth import did_credentials
from sdk.messaging.client import ClientConfig, SecureClient
from sdk.messaging.envelope import Message, Signer, new_id
from sdk.messaging.errors import MessagingError, RemoteError, RequestTimeout
from sdk.messaging.status import MqttStatusListSource
from sdk.messaging.transport import Will

log = logging.getLogger(__name__)

ConfigCallback = Callable[["Config"], Awaitable[Any] | Any]

_TRANSIENT = ("timeout", "busy", "status_unavailable")   # worth another try at connect()
MAX_OUTBOX = 1000          # unacknowledged events kept per device (oldest dropped beyond, logged)
_CONNECT_ATTEMPTS = 3

#: device states
CONNECTING = "connecting"
ADMITTED = "admitted"
WAITING = "waiting"        # coordinator away, or re-authenticating
REVOKED = "revoked"
CLOSED = "closed"


@dataclass(eq=False)
class Config:
    """A verified adaptation config as the app sees it."""

    version: int
    changes: dict[str, Any]
    state: dict[str, Any]
    event_id: str | None = None
    rules: tuple[str, ...] = ()
    received_at: float = 0.0
    _done: asyncio.Future[tuple[str, str | None]] | None = field(default=None, repr=False)

    async def ack(self) -> None:
        """Report this version applied."""
        if self._done is not None and not self._done.done():
            self._done.set_result((protocol.APPLIED, None))

    async def fail(self, reason: str) -> None:
        """Report this version failed (``reason`` goes to the coordinator)."""
        if self._done is not None and not self._done.done():
            self._done.set_result((protocol.FAILED, str(reason)[:200]))


@dataclass(eq=False)
class _Outgoing:
    """An event waiting for the coordinator's acknowledgement."""

    body: dict[str, Any]
    sent_gen: int = -1          # admission generation it was last sent in (-1: not yet)
    sent_at: float = 0.0


@dataclass(frozen=True)
class Admission:
    """The result of a successful authentication."""

    coordinator: str
    session: str
    boot: str
    heartbeat_ttl: float
    pending: int


class Device:
    """One device's connection to the coordination mesh (``async with``)."""

    def __init__(
        self,
        key: Key,
        credential: dict[str, Any] | str,
        *,
        broker: str,
        coordinator: str,
        trust: TrustPolicy | None = None,
        on_config: ConfigCallback | None = None,
        heartbeat_ttl: float | None = None,
        last_version: int = 0,
        state_file: str | Path | None = None,
        capabilities: Iterable[str] | None = None,
        attributes: dict[str, Any] | None = None,
        auth_timeout: float = 5.0,
        client_config: ClientConfig | None = None,
        max_outbox: int = MAX_OUTBOX,
        **transport_options: Any,
    ) -> None:
        if not isinstance(key, Key):
            raise TypeError("key must be an sdk.identity.Key")
        if max_outbox < 1:
            raise ValueError("max_outbox must be at least 1")
        if heartbeat_ttl is not None and heartbeat_ttl <= 0:
            raise ValueError("heartbeat_ttl must be positive")
        self.key = key
        self.did = key.did
        self.credential = credential
        self.coordinator = coordinator.partition("#")[0]
        self.trust = trust if trust is not None else TrustPolicy(
            {_issuer_of(credential): {COORDINATOR_CREDENTIAL}})
        self.on_config = on_config
        self.heartbeat_ttl = heartbeat_ttl
        self.auth_timeout = auth_timeout
        self.capabilities = None if capabilities is None else sorted(capabilities)
        self.attributes = dict(attributes or {})
        self.state_file = Path(state_file) if state_file is not None else None
        self.max_outbox = max_outbox
        self._outbox: dict[str, _Outgoing] = {}
        self._admission_gen = 0
        self._send_lock = asyncio.Lock()
        self.last_version = self._load_version(last_version)
        self.state: str = CLOSED
        self.admission: Admission | None = None
        self.refused_reason: str | None = None
        self.rejected_configs: list[str] = []      # reasons of configs refused before the app
        self.status_source = MqttStatusListSource()
        self._checker = StatusChecker(self.status_source)
        self._token = protocol.token(self.did)
        self._coord_cmd = protocol.device_commands(protocol.token(self.coordinator))
        will_body = {"state": "offline", "reason": "connection_lost", "did": self.did}
        _, will_wire = Signer(key).seal(protocol.device_presence(self._token), will_body,
                                        type=protocol.PRESENCE, ttl=365 * 86400)
        options = {**did_credentials(key), **transport_options}
        options.setdefault("will", Will(protocol.device_presence(self._token), will_wire, qos=1, retain=True))
        self.client = SecureClient(broker, key, config=client_config or ClientConfig(qos=0), **options)
        self._admitted = asyncio.Event()
        self._changed = asyncio.Event()
        self._inbox: asyncio.Queue[ConfigVersion] = asyncio.Queue()
        self._app_queue: asyncio.Queue[Config] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._reauth: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._coordinator_boot: str | None = None
        self._ticket: tuple[str, str] | None = None    # (next_challenge, coordinator boot)
        self._last_delivered: Config | None = None

    # ------------------------------------------------------------------ lifecycle
    async def __aenter__(self) -> Device:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def connect(self, *, authenticate: bool = True) -> None:
        """Connect, subscribe, announce presence and (by default) authenticate."""
        self.state = CONNECTING
        await self.client.connect()
        await self.status_source.attach(self.client)
        await self.client.subscribe(protocol.device_config(self._token), self._on_config_msg, qos=1)
        await self.client.subscribe(protocol.device_commands(self._token), self._on_notice, qos=1)
        await self.client.subscribe(protocol.device_presence(protocol.token(self.coordinator)),
                                    self._on_coordinator_presence, qos=1)
        self.client.transport.add_on_connect(self._on_reconnect)
        self._worker = asyncio.ensure_future(self._config_worker())
        await self._publish_presence("online")
        if authenticate:
            for attempt in range(_CONNECT_ATTEMPTS):
                try:
                    await self.authenticate()
                    break
                except AdmissionError as exc:
                    if exc.reason not in _TRANSIENT or attempt == _CONNECT_ATTEMPTS - 1:
                        raise
                    log.info("authentication attempt %d failed (%s); retrying", attempt + 1, exc.reason)
                    await asyncio.sleep(0.1 * 2 ** attempt)

    async def aclose(self) -> None:
        """Say offline (retained), stop tasks and disconnect."""
        if self.state == CLOSED and self._worker is None:
            return
        prev = self.state
        self.state = CLOSED
        with contextlib.suppress(MessagingError, OSError):
            if prev != REVOKED and self.client.connected:
                await self._publish_presence("offline", reason="closed")
        for task in [self._reauth, self._heartbeat, self._worker, *self._tasks]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._worker = self._heartbeat = self._reauth = None
        await self.client.aclose()

    @property
    def admitted(self) -> bool:
        """True while the coordinator has admitted this device."""
        return self.state == ADMITTED

    async def wait_admitted(self, timeout: float | None = None) -> None:
        """Wait until (re-)admitted; raises NotAdmitted if revoked or on timeout."""
        if self.state == REVOKED:
            raise NotAdmitted("device credential revoked", reason="revoked")
        try:
            await asyncio.wait_for(self._admitted.wait(), timeout)
        except asyncio.TimeoutError:
            raise NotAdmitted(f"not admitted within {timeout}s ({self.refused_reason or self.state})",
                              reason=self.refused_reason or "not_admitted") from None
        if self.state == REVOKED:
            raise NotAdmitted("device credential revoked", reason="revoked")

    # ------------------------------------------------------------------ authentication
    async def authenticate(self, *, resume: bool = True) -> Admission:
        """Run the mutual DID+VP handshake; raises :class:`AdmissionError` with a reason.

        After a first admission the coordinator hands out a single-use ``next_challenge``; with
        ``resume`` the next authentication answers it directly (one round trip, the coordinator's
        presentation comes back in the admission reply). A stale one falls back to the full form.
        """
        ticket, self._ticket = self._ticket, None
        if resume and ticket is not None and ticket[1] == self._coordinator_boot:
            try:
                return await self._present(ticket[0], nonce=secrets.token_urlsafe(16))
            except AdmissionError as exc:
                if exc.reason not in ("wrong_challenge", "timeout"):
                    raise
                log.debug("resumed authentication refused (%s); full handshake", exc.reason)
        nonce = secrets.token_urlsafe(16)
        hello = await self._request(protocol.HELLO, {"nonce": nonce})
        body = hello.body if isinstance(hello.body, dict) else {}
        challenge = body.get("challenge")
        if not isinstance(challenge, str):
            raise self._refused(AdmissionError("coordinator sent no challenge", reason="malformed"))
        self._check_coordinator(body.get("vp"), nonce)
        return await self._present(challenge)

    def _check_coordinator(self, vp: Any, nonce: str) -> None:
        try:
            check_presentation(vp, challenge=nonce, domain=self.did, trust=self.trust,
                               status=self._checker, credential_type=COORDINATOR_CREDENTIAL,
                               expected_holder=self.coordinator)
        except AdmissionError as exc:
            log.warning("coordinator %s failed mutual authentication: %s", self.coordinator, exc)
            raise self._refused(AdmissionError(f"coordinator not trusted: {exc}",
                                               reason="untrusted_coordinator")) from exc

    async def _present(self, challenge: str, *, nonce: str | None = None) -> Admission:
        vp = present(self.credential, self.key, challenge=challenge, domain=self.coordinator)
        req: dict[str, Any] = {"challenge": challenge, "vp": vp, "last_version": self.last_version}
        if self.heartbeat_ttl is not None:      # else the coordinator's configured TTL applies
            req["heartbeat_ttl"] = self.heartbeat_ttl
        if nonce is not None:
            req["nonce"] = nonce
        if self.capabilities is not None:
            req["capabilities"] = self.capabilities
        if self.attributes:
            req["attributes"] = self.attributes
        reply = await self._request(protocol.PRESENT, req)
        rb = reply.body if isinstance(reply.body, dict) else {}
        if nonce is not None:
            self._check_coordinator(rb.get("vp"), nonce)
        try:
            admission = Admission(self.coordinator, str(rb["session"]), str(rb["boot"]),
                                  float(rb.get("heartbeat_ttl") or self.heartbeat_ttl or 30.0),
                                  int(rb.get("pending", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise self._refused(AdmissionError("malformed admission reply", reason="malformed")) from exc
        if isinstance(rb.get("next_challenge"), str):
            self._ticket = (rb["next_challenge"], admission.boot)
        self.admission = admission
        self._coordinator_boot = admission.boot
        self.refused_reason = None
        self.state = ADMITTED
        self._admission_gen += 1
        if self._outbox:        # queued before, sent before the waiters' new events (same lock, order)
            self._spawn(self._drain())
        self._admitted.set()
        self._start_heartbeat(admission.heartbeat_ttl)
        log.info("device %s admitted by %s (session %s)", self.did, self.coordinator, admission.session)
        return admission

    async def _request(self, type_: str, body: dict[str, Any]) -> Message:
        try:
            return await self.client.request(self._coord_cmd, body, type=type_, timeout=self.auth_timeout,
                                             expect_from=self.coordinator)
        except RemoteError as exc:
            raise self._refused(AdmissionError(f"coordinator refused: {exc}", reason=exc.reason)) from exc
        except RequestTimeout as exc:
            raise self._refused(AdmissionError(f"no answer from coordinator: {exc}", reason="timeout")) from exc

    def _refused(self, exc: AdmissionError) -> AdmissionError:
        self.refused_reason = exc.reason
        self._admitted.clear()
        if exc.reason == "revoked":
            self.state = REVOKED
            self._stop_heartbeat()
        elif self.state != CLOSED:
            self.state = WAITING
        return exc

    def _schedule_reauth(self) -> None:
        if self.state in (CLOSED, REVOKED) or (self._reauth is not None and not self._reauth.done()):
            return
        self.state = WAITING
        self._admitted.clear()
        self._reauth = asyncio.ensure_future(self._reauth_loop())

    async def _reauth_loop(self) -> None:
        delay = 0.05
        while self.state not in (CLOSED, REVOKED):
            try:
                await self.client.transport.wait_connected(timeout=None)
                await self.authenticate()
                return
            except AdmissionError as exc:
                if exc.reason == "revoked":
                    log.warning("device %s refused: revoked", self.did)
                    return
                log.info("re-authentication failed (%s), retrying in %.2fs", exc.reason, delay)
            except MessagingError as exc:
                log.info("re-authentication interrupted (%s), retrying", exc.reason)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _on_reconnect(self, session_present: bool) -> None:
        if self.state in (CLOSED, REVOKED):
            return
        self._spawn(self._publish_presence("online"))
        if self.state != CONNECTING:
            self._schedule_reauth()

    # ------------------------------------------------------------------ presence
    async def _publish_presence(self, state: str, *, reason: str | None = None) -> None:
        ttl = self.admission.heartbeat_ttl if self.admission is not None else self.heartbeat_ttl
        body: dict[str, Any] = {"state": state, "did": self.did, "ttl": ttl}
        if reason:
            body["reason"] = reason
        await self.client.publish(protocol.device_presence(self._token), body, type=protocol.PRESENCE,
                                  retain=True, qos=1)

    def _start_heartbeat(self, ttl: float) -> None:
        self._stop_heartbeat()
        self._heartbeat = asyncio.ensure_future(self._heartbeat_loop(ttl))

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None and self._heartbeat is not asyncio.current_task():
            self._heartbeat.cancel()
        self._heartbeat = None

    async def _heartbeat_loop(self, ttl: float) -> None:
        seq = 0
        while self.state == ADMITTED:
            await asyncio.sleep(ttl / 3)
            seq += 1
            try:
                await self.client.publish(protocol.device_presence(self._token), {"seq": seq},
                                          type=protocol.HEARTBEAT, qos=0)
            except MessagingError as exc:
                log.debug("heartbeat not sent: %s", exc.reason)
            stale = time.monotonic() - ttl
            for item in self._outbox.values():      # unacknowledged for a whole TTL: send again
                if 0 <= item.sent_gen and item.sent_at < stale:
                    item.sent_gen = -1
            if any(item.sent_gen < 0 for item in self._outbox.values()):
                self._spawn(self._drain())

    def pause_heartbeats(self) -> None:
        """Stop sending heartbeats (for tests and apps going silent on purpose)."""
        self._stop_heartbeat()

    # ------------------------------------------------------------------ events
    async def publish_event(self, event: Event, *, wait_admitted: float | None = 5.0) -> str:
        """Queue a validated event and send it; returns its ``event_id``.

        It stays in the outbox until the coordinator acknowledges it. While the coordinator is
        away this waits up to ``wait_admitted`` s, then returns with the event still queued (it
        goes out on re-admission). Raises :class:`NotAdmitted` only when revoked.
        """
        if not isinstance(event, Event):
            raise TypeError("event must be an sdk.coord.events.Event (use the helpers)")
        if self.state == REVOKED:
            raise NotAdmitted("device credential revoked", reason="revoked")
        event_id = new_id()
        self._outbox[event_id] = _Outgoing({**event.to_body(), "event_id": event_id})
        while len(self._outbox) > self.max_outbox:
            dropped = next(iter(self._outbox))
            del self._outbox[dropped]
            log.warning("device %s outbox full (%d): dropped unacknowledged event %s", self.did,
                        self.max_outbox, dropped)
        self._save_state()
        if self.state != ADMITTED:
            try:
                await self.wait_admitted(wait_admitted)
            except NotAdmitted as exc:
                if exc.reason == "revoked":
                    self._outbox.pop(event_id, None)
                    self._save_state()
                    raise
                log.info("event %s queued until the coordinator admits %s (%s)", event_id, self.did,
                         exc.reason)
                return event_id
        await self._drain()
        return event_id

    @property
    def outbox(self) -> list[str]:
        """Ids of the events not yet acknowledged by the coordinator, oldest first."""
        return list(self._outbox)

    async def _drain(self) -> None:
        """Send every queued event not yet sent in this admission, in order (one sender at a time)."""
        async with self._send_lock:
            for event_id, item in list(self._outbox.items()):
                if self.state != ADMITTED:
                    return
                if item.sent_gen == self._admission_gen or event_id not in self._outbox:
                    continue
                gen = self._admission_gen
                try:
                    await self.client.publish(protocol.device_events(self._token), item.body,
                                              type=protocol.EVENT, qos=1)
                except MessagingError as exc:
                    log.info("event %s not sent (%s); it stays queued", event_id, exc.reason)
                    return
                item.sent_gen, item.sent_at = gen, time.monotonic()

    def _on_event_ack(self, msg: Message) -> None:
        body = msg.body if isinstance(msg.body, dict) else {}
        event_id = body.get("event_id")
        if not isinstance(event_id, str) or self._outbox.pop(event_id, None) is None:
            return
        if body.get("status") == protocol.ACK_REJECTED:
            log.warning("coordinator rejected event %s: %s", event_id, body.get("reason"))
        self._save_state()

    async def screen_available(self, width: int, height: int, *, density: float | None = None,
                               screen_id: str | None = None) -> str:
        """Publish ``screen_available``."""
        return await self.publish_event(screen_available(width, height, density=density, screen_id=screen_id))

    async def screen_lost(self, *, screen_id: str | None = None) -> str:
        """Publish ``screen_lost``."""
        return await self.publish_event(screen_lost(screen_id=screen_id))

    async def input_methods(self, methods: list[str]) -> str:
        """Publish ``input_methods``."""
        return await self.publish_event(input_methods(methods))

    async def battery(self, battery_class: str, *, level: float | None = None) -> str:
        """Publish ``battery``."""
        return await self.publish_event(battery(battery_class, level=level))

    async def network(self, network_class: str) -> str:
        """Publish ``network``."""
        return await self.publish_event(network(network_class))

    async def custom_event(self, event_type: str, **fields: Any) -> str:
        """Publish any other event."""
        return await self.publish_event(custom(event_type, **fields))

    async def announce(self, *, capabilities: Iterable[str] | None = None,
                       attributes: dict[str, Any] | None = None) -> None:
        """Tell the coordinator about capabilities/attributes beyond the credential's."""
        if capabilities is not None:
            self.capabilities = sorted(capabilities)
        if attributes:
            self.attributes.update(attributes)
        body: dict[str, Any] = {"attributes": self.attributes}
        if self.capabilities is not None:
            body["capabilities"] = self.capabilities
        await self.client.publish(protocol.device_events(self._token), body, type=protocol.ANNOUNCE, qos=1)

    # ------------------------------------------------------------------ configs
    def _on_config_msg(self, msg: Message) -> None:
        if msg.type != protocol.CONFIG:
            return
        try:
            if msg.sender != self.coordinator:
                raise ConfigRejected(f"config signed by {msg.sender}, not the coordinator",
                                     reason="untrusted_sender")
            try:
                cfg = ConfigVersion.from_body(msg.body)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise ConfigRejected(f"malformed config: {exc}", reason="malformed") from exc
            if cfg.did != self.did:
                raise ConfigRejected(f"config for {cfg.did}, not this device", reason="wrong_device")
        except ConfigRejected as exc:
            self.rejected_configs.append(exc.reason)
            log.warning("device %s rejected a config: %s: %s", self.did, exc.reason, exc)
            return
        self._inbox.put_nowait(cfg)

    async def _config_worker(self) -> None:
        while True:
            cfg = await self._inbox.get()
            if cfg.version <= self.last_version:
                log.debug("dropping config v%d (already handled v%d)", cfg.version, self.last_version)
                continue
            if cfg.version != self.last_version + 1:
                log.warning("config v%d after v%d: versions in between were superseded",
                            cfg.version, self.last_version)
            status, reason, apply_ms = await self._deliver(cfg)
            self.last_version = cfg.version
            self._save_version()
            self._changed.set()
            self._changed = asyncio.Event()
            try:
                body: dict[str, Any] = {"version": cfg.version, "status": status, "apply_ms": apply_ms}
                if reason:
                    body["reason"] = reason
                await self.client.publish(protocol.device_events(self._token), body, type=protocol.REPORT, qos=1)
            except MessagingError as exc:
                log.warning("could not report config v%d: %s", cfg.version, exc.reason)

    async def _deliver(self, cv: ConfigVersion) -> tuple[str, str | None, float]:
        loop = asyncio.get_running_loop()
        cfg = Config(cv.version, cv.changes, cv.state, cv.event_id, cv.rules, time.time())
        t0 = time.perf_counter()
        if self.on_config is not None:
            try:
                res = self.on_config(cfg)
                if inspect.isawaitable(res):
                    await res
                status, reason = protocol.APPLIED, None
            except Exception as exc:  # noqa: BLE001 - the app's failure is reported, not raised
                log.warning("config v%d failed to apply: %s", cv.version, exc)
                status, reason = protocol.FAILED, f"{type(exc).__name__}: {exc}"[:200]
        else:
            cfg._done = loop.create_future()
            self._app_queue.put_nowait(cfg)
            status, reason = await cfg._done
        return status, reason, round((time.perf_counter() - t0) * 1000, 3)

    async def configs(self) -> AsyncIterator[Config]:
        """Verified configs, in version order (without ``on_config``); unacked ones ack on next()."""
        if self.on_config is not None:
            raise RuntimeError("configs() is for devices without an on_config callback")
        while True:
            prev = self._last_delivered
            if prev is not None:
                await prev.ack()
            cfg = await self._app_queue.get()
            self._last_delivered = cfg
            yield cfg

    async def wait_version(self, version: int, timeout: float | None = None) -> None:
        """Wait until config ``version`` (or later) has been handled."""
        async def wait() -> None:
            while self.last_version < version:
                await self._changed.wait()
        await asyncio.wait_for(wait(), timeout)

    def _load_version(self, default: int) -> int:
        if self.state_file is None or not self.state_file.exists():
            return default
        try:
            data = json.loads(self.state_file.read_text())
            version = max(default, int(data["last_version"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable device state %s: %s", self.state_file, exc)
            return default
        outbox = data.get("outbox", [])
        for body in outbox if isinstance(outbox, list) else []:
            if isinstance(body, dict) and isinstance(body.get("event_id"), str):
                self._outbox[body["event_id"]] = _Outgoing(body)
        return version

    def _save_version(self) -> None:
        self._save_state()

    def _save_state(self) -> None:
        """Write ``last_version`` and the unacknowledged events to ``state_file`` (atomically)."""
        if self.state_file is None:
            return
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"last_version": self.last_version,
                                   "outbox": [item.body for item in self._outbox.values()]}))
        os.replace(tmp, self.state_file)

    # ------------------------------------------------------------------ from the coordinator
    def _on_notice(self, msg: Message) -> None:
        if msg.sender != self.coordinator:
            return
        if msg.type == protocol.EVENT_ACK:
            self._on_event_ack(msg)
            return
        if msg.type != protocol.NOTICE:
            return
        body = msg.body if isinstance(msg.body, dict) else {}
        notice = body.get("notice")
        if notice == protocol.NOTICE_REVOKED:
            log.warning("device %s: coordinator says credential revoked", self.did)
            self.refused_reason = "revoked"
            self.state = REVOKED
            self._admitted.clear()
            self._stop_heartbeat()
        elif notice in (protocol.NOTICE_REAUTH, protocol.NOTICE_NOT_ADMITTED):
            self._schedule_reauth()

    def _on_coordinator_presence(self, msg: Message) -> None:
        if msg.type != protocol.PRESENCE or msg.sender != self.coordinator:
            return
        body = msg.body if isinstance(msg.body, dict) else {}
        if body.get("state") == "offline":
            if self.state == ADMITTED:
                log.info("coordinator went offline; waiting for it")
                self.state = WAITING
                self._admitted.clear()
                self._stop_heartbeat()
        elif body.get("state") == "online" and (
                self.state == WAITING
                or (self.state == ADMITTED and body.get("boot") != self._coordinator_boot)):
            log.info("coordinator online (boot %s); re-authenticating", body.get("boot"))
            self._schedule_reauth()

    def _spawn(self, aw: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _issuer_of(credential: Any) -> str:
    if isinstance(credential, dict):
        issuer = credential.get("issuer")
        if isinstance(issuer, dict):
            issuer = issuer.get("id")
        if isinstance(issuer, str):
            return issuer
    if isinstance(credential, str):  # VC-JWT: iss claim
        from sdk.messaging.envelope import b64d
        try:
            return str(json.loads(b64d(credential.split(".")[1]))["iss"])
        except (ValueError, KeyError, IndexError, MessagingError):
            pass
    raise ValueError("cannot tell the credential's issuer; pass trust= explicitly")


class SyncDevice:
    """A thin blocking facade over :class:`Device` (its own event loop in a thread)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="autoglm-device", daemon=True)
        self._thread.start()
        self.device: Device = self._call(_make_device(args, kwargs))

    def _call(self, coro: Awaitable[Any], timeout: float | None = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    def __enter__(self) -> SyncDevice:
        self._call(self.device.connect())
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish_event(self, event: Event) -> str:
        """Blocking :meth:`Device.publish_event`."""
        return str(self._call(self.device.publish_event(event)))

    def wait_version(self, version: int, timeout: float | None = None) -> None:
        """Blocking :meth:`Device.wait_version`."""
        self._call(self.device.wait_version(version, timeout), None)

    def close(self) -> None:
        """Disconnect and stop the loop thread."""
        if self._loop.is_running():
            self._call(self.device.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


async def _make_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Device:
    return Device(*args, **kwargs)


__all__ = ["Admission", "Config", "Device", "SyncDevice", "ADMITTED", "WAITING", "REVOKED", "CLOSED",
           "CONNECTING"]
