"""The coordinator daemon: admits devices, runs rules on their events, pushes signed configs.

Everything goes through one :class:`~sdk.messaging.client.SecureClient` (signed envelopes). The
order of work per event: verify sender and admission → rules → commit the new desired versions
to SQLite → publish each target's missing versions in order (one pump per device) → count
reports into the convergence metrics. A restart reloads the store; devices see the new
``boot`` in the coordinator's retained presence, re-authenticate stating their last version,
and the pump sends what they missed.

Each device is one :class:`~sdk.coord.coordinator.registry.DeviceRecord`; while admitted it holds
a :class:`~sdk.coord.coordinator.registry.Session` that ends when the device goes offline, its
heartbeat lapses, its credential expires (one timer over a heap of deadlines) or is revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import heapq
import inspect
import json
import logging
import math
import os
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sdk.coord import protocol
from sdk.coord.backpressure import busy_message
from sdk.coord.coordinator.admission import AdmissionControl, SenderLimiter, TokenBucket, WriteBatch
from sdk.coord.coordinator.auth import (
    COORDINATOR_CREDENTIAL,
    RESUME_TTL,
    TICKET_RENEW_INTERVAL,
    Challenges,
    check_addressed,
    check_presentation,
    coordinator_credential,
    device_credential,
    present,
    ticket_digest,
)
from sdk.coord.coordinator.commands_ops import register_command_ops
from sdk.coord.coordinator.config import CoordinatorConfig, IssuerConfig
from sdk.coord.coordinator.desired_ops import drop_pinned, register_desired_ops
from sdk.coord.coordinator.errors import (
    AdmissionError,
    CoordinationError,
    InvalidValue,
    RuleOutputError,
    StoreBehind,
    StoreCorrupt,
    StoreMissing,
)
from sdk.coord.coordinator.fleet_caches import fit_caches
from sdk.coord.coordinator.fleet_ops import handle_properties, load_operator_state, register_fleet_ops
from sdk.coord.coordinator.lock import DataDirLock
from sdk.coord.coordinator.metrics import CoordinatorMetrics
from sdk.coord.coordinator.model_policy import ConfigAdvisor, ModelPolicy
from sdk.coord.coordinator.operations import OPERATOR_CREDENTIAL, Operations, OperatorAccess
from sdk.coord.coordinator.registry import (
    EXPIRED,
    OFFLINE,
    ONLINE,
    REVOKED,
    DeviceRecord,
    Registry,
    Session,
)
from sdk.coord.coordinator.rule_rollouts import start_rule_rollouts
from sdk.coord.coordinator.rules import RuleSet
from sdk.coord.coordinator.store import ConfigVersion, Store
from sdk.coord.coordinator.store import delta as store_delta
from sdk.coord.coordinator.values import MAX_INT, check_json, finite, integer, strict_dumps
from sdk.coord.events import Event, InvalidEvent
from sdk.errors import AutoGLMError
from sdk.identity import (
    IdentityError,
    Key,
    StatusChecker,
    StatusList,
    TrustPolicy,
    create_status_list_credential,
    status_entry,
)
from sdk.identity.hazmat import json as strict_json
from sdk.identity.status_list import DEFAULT_REFRESH_MARGIN, DEFAULT_TTL
from sdk.messaging.broker_auth import did_credentials
from sdk.messaging.client import ClientConfig, SecureClient
from sdk.messaging.envelope import DEFAULT_MAX_BYTES, Message, Signer
from sdk.messaging.errors import MessagingError, RejectedMessage
from sdk.messaging.policy import Retained
from sdk.messaging.status import (
    STATUS_GET,
    MqttStatusListSource,
    publish_status_list,
    republish_delay,
)
from sdk.messaging.transport import Will

log = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], Any]
#: a request handler on the coordinator's command topic: ``handler(msg) -> reply body`` (or awaitable)
CommandHandler = Callable[[Message], Any]
STATUS_LIST_SIZE = 131072
#: Re-sign the issuer's status list this often (seconds): well inside its validity.
STATUS_REFRESH = (DEFAULT_TTL - DEFAULT_REFRESH_MARGIN).total_seconds() / 2
#: The largest config document the coordinator commits: base64url inside a signed envelope
#: (a third larger) with room for the header and signature, it must fit the envelope limit.
MAX_CONFIG_BYTES = DEFAULT_MAX_BYTES * 3 // 4 - 4096
#: heartbeat_ttl a device may ask for (seconds).
MIN_TTL, MAX_TTL = 0.1, 3600.0
_ISSUER_STATE_FILE = "issuer-state.json"
_ISSUER_MIGRATED = "issuer_state_migrated"
_MAX_CAPABILITIES = 256
#: config pumps a fan-out runs at once (each waits for its device's acknowledgement from the broker):
#: 256 keep a loopback broker busy; each in flight holds a sealed config and paho's message state,
#: so 1,024 left ~3 MB more of freed-but-held heap after a 10,000-device fan-out for no speed
PUMP_CONCURRENCY = 256
#: seconds between status.json writes while reports of a push come in, or devices are being
#: admitted, and a snapshot costs over 20 ms
STATUS_BUSY_INTERVAL = 10.0
_MAX_ATTRIBUTES_BYTES = 16 * 1024
_DEPLOYMENT = "deployment"       # meta key: the id all instances over one store share


def fingerprint(credential: Mapping[str, Any]) -> str:
    """A stable identifier of a credential: its ``id``, else a digest of its strict JSON."""
    cid = credential.get("id")
    if isinstance(cid, str) and cid:
        return cid
    return "sha256:" + hashlib.sha256(strict_dumps(credential, sort_keys=True).encode()).hexdigest()


def _valid_until(credential: Mapping[str, Any]) -> float | None:
    """The credential's ``validUntil`` (or VC 1.1 ``expirationDate``) as epoch seconds."""
    from sdk.identity.datetimes import parse_datetime

    text = credential.get("validUntil", credential.get("expirationDate"))
    if text is None:
        return None
    try:
        return parse_datetime(text).timestamp()
    except (IdentityError, ValueError, TypeError) as exc:
        raise AdmissionError(f"credential validUntil is not a dateTime: {exc}", reason="malformed") from exc


def _status_entries(credential: Mapping[str, Any]) -> list[dict[str, Any]]:
    status = credential.get("credentialStatus")
    entries = status if isinstance(status, list) else [status] if status is not None else []
    return [dict(e) for e in entries if isinstance(e, dict)]


class Coordinator:
    """One coordinator: ``await c.start()`` ... ``await c.stop()`` (or ``async with``).

    ``fresh=True`` starts with an empty store when the existing one is corrupt, 0 bytes or
    missing (the bad file is moved aside); without it such a store refuses to start with a
    :class:`~sdk.coord.coordinator.errors.StoreError` (``store_corrupt`` / ``store_missing``).
    """

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
        issuer_config: IssuerConfig | None = None,
        heartbeat_ttl: float = 30.0,
        durability: str = "normal",
        sweep_interval: float = 1.0,
        metrics_port: int = 0,
        client_config: ClientConfig | None = None,
        fresh: bool = False,
        store_url: str | None = None,
        status_republish: float = 0.0,
        hello_rate: float = 500.0,
        hello_burst: int = 1000,
        max_admissions: int = 256,
        direct_admission: bool = True,
        advisor: ConfigAdvisor | None = None,
        **transport_options: Any,
    ) -> None:
        self.key = key
        self.did = key.did
        self.broker = broker
        self.data_dir = Path(data_dir)
        self.issuer = issuer
        self.trust = trust.allow(issuer.did, "DeviceCredential", OPERATOR_CREDENTIAL) if issuer is not None else trust
        self.rules = rules or RuleSet()
        if credential is None:
            if issuer is None:
                raise ValueError("give the coordinator a credential, or an issuer key to self-issue one")
            credential = coordinator_credential(issuer, self.did)
        self.credential = credential
        self.heartbeat_ttl = finite(heartbeat_ttl, what="heartbeat_ttl", minimum=MIN_TTL, maximum=MAX_TTL)
        self.durability = durability
        self.sweep_interval = finite(sweep_interval, what="sweep_interval", minimum=0.001, maximum=3600)
        self.metrics_port = metrics_port
        self.fresh = fresh
        # -- shared store ([store] url; else DATA_DIR/coordinator.db) and the HA runner's hook
        self.store_url = store_url
        #: applied to the store right after it opens, before anything is read or written (ha.py fences it)
        self.store_hook: Callable[[Store], Store] | None = None
        # -- end shared store
        self.boot = secrets.token_hex(8)
        #: the same for every instance over one store (its ``meta`` row, made on the first start):
        #: a resumption ticket is good with any of them, never with a coordinator on another store
        self.deployment: str | None = None
        #: wall clock of ticket expiry and renewal (injectable for tests; the challenges have their own)
        self.ticket_clock: Callable[[], float] = time.time
        self.registry = Registry()
        self.metrics = CoordinatorMetrics()
        self.challenges = Challenges()
        #: presentations signed for hellos from senders never admitted (a flood cannot buy more)
        self.hello_budget = TokenBucket(hello_rate, hello_burst)
        #: handshake requests (hello, present) per sender never admitted
        self.request_limiter = SenderLimiter(rate=2.0, burst=10)
        # -- admission under storms: handshakes in flight are bounded, beyond it hellos get busy
        self.admission = AdmissionControl(max_admissions)
        #: accept a first presentation over its own envelope's id (one round trip, no hello)
        self.direct_admission = direct_admission
        #: admitted devices' records, one transaction per event-loop turn, written before any reply
        self.device_writes: WriteBatch[dict[str, Any]] = WriteBatch(self._save_device_rows)
        # -- end admission under storms
        # verified, ordered lists from trusted issuers: an old list re-delivered never wins
        self.status_source = MqttStatusListSource(self.trust)
        self.checker = StatusChecker(self.status_source)
        self.status_source.add_listener(self._on_status_list)
        self.store: Store | None = None
        #: named operator operations (``coord.operate`` requests)
        self.operations = Operations()
        #: extra request types served on the command topic (besides hello and present)
        self.commands: dict[str, CommandHandler] = {}
        # -- operator API: coord.operate requests, authorized, role-checked and audited (operations.py)
        self.operators = OperatorAccess(self)
        self.register_command(protocol.OPERATE, self.operators.dispatch)
        register_fleet_ops(self)        # fleet.query, device.show, tags.set, audit.list (fleet_ops.py)
        # -- end operator API
        # -- credential lifecycle (enrollment.py): enrollment, renewal, rotation, revocation by DID
        from sdk.coord.coordinator.enrollment import Enrollment, register_enrollment

        self.status_list_size = STATUS_LIST_SIZE if issuer_config is None else issuer_config.status_list_size
        self.enrollment: Enrollment | None = None
        if issuer is not None:
            self.enrollment = register_enrollment(self, issuer_config)
        # -- end credential lifecycle
        # -- desired state and direct commands (desired_ops.py, commands_ops.py)
        register_desired_ops(self)
        register_command_ops(self)
        # -- end desired state and direct commands
        # -- roll-outs (rollout_ops.py, rollouts.py): staged changes behind health gates
        from sdk.coord.coordinator.rollout_ops import register_rollout_ops

        self.rollouts = register_rollout_ops(self)
        # -- end roll-outs
        # -- model-made configs (model_policy.py): rules with policy = "model" ask ``advisor``
        self.model_policy = ModelPolicy(advisor)
        self.model_policy.bind_metrics(self.metrics.registry)
        # -- end model-made configs
        self._token = protocol.token(self.did)
        presence = protocol.coordinator_presence(self._token)
        _, will = Signer(key).seal(presence, {"state": "offline", "boot": self.boot}, type=protocol.PRESENCE,
                                   ttl=365 * 86400)
        options = {**did_credentials(key), **transport_options}
        # -- a username in the broker URL is kept (an ejabberd cluster's: the DID's lowercased id)
        if "username" not in transport_options and urlsplit(broker.split(",", 1)[0]).username:
            options.pop("username")
        # -- end URL username
        options.setdefault("will", Will(presence, will, qos=1, retain=True))
        # a fan-out past the send queue's max_pending waits for room (FIFO) instead of failing
        # queue_full, so a config to more devices than the queue holds still reaches every one
        options.setdefault("queue_wait", 30.0)
        self.client = SecureClient(broker, key, config=client_config or ClientConfig(qos=0), **options)
        self._reports: list[tuple[str, int, str, str | None, float | None]] = []
        self._reports_at = float("-inf")        # monotonic time of the last reports recorded
        self._push_at = float("-inf")           # monotonic time the last push started
        self._admitted_at = float("-inf")       # monotonic time of the last admission
        self._listeners: list[Listener] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._http: Any = None
        self._status_credential: dict[str, Any] | None = None
        self._status_list: StatusList | None = None
        self._status_signed = 0.0
        # -- status list re-published every status_republish s (jittered; 0 = never, the default:
        # each re-publication is delivered to every subscribed device, O(fleet)) and served on
        # request (STATUS_GET on the command topic, which devices missing it send): a clustered
        # broker may not deliver a retained list to subscribers on other nodes
        self.status_republish = finite(status_republish, what="status_republish", minimum=0, maximum=86400)
        self._status_republish_at = time.monotonic() + republish_delay(self.status_republish)
        self.register_command(STATUS_GET, self._status_get)
        # -- end status list re-publication
        self.register_command(protocol.TICKET, self._renew_ticket)      # fresh resumption tickets
        self._deadlines: list[tuple[float, str, str]] = []     # (valid_until, did, session id)
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._dirty = True
        # -- status snapshot: per device, the JSON of its fleet-shared fields (one interned string per
        # distinct value, rendered again only when the device changed) and of its store fields; its
        # own fields (did, name, times, status entry...) are rendered as the file is written
        self._status_rows: dict[str, tuple[str, str]] = {}          # did -> (kind, shared fields)
        self._status_store: dict[str, str] = {}                     # did -> its store fields' JSON (shared)
        self._status_order: list[str] | None = None                 # DIDs by (kind, did)
        self._status_cost = 0.0                                     # seconds the last write took
        self._challenges_swept = 0.0
        # -- end status snapshot
        self.started = False
        self._lock = DataDirLock(self.data_dir)       # one daemon per data directory (lock.py)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: CoordinatorConfig, *, key: Key | None = None, broker: str | None = None,
                    issuer: Key | None = None, **kwargs: Any) -> Coordinator:
        """Build from a loaded :class:`CoordinatorConfig` (key from the keystore unless given)."""
        key = key or load_key(config)
        credential = None
        if config.credential is not None:
            from sdk.identity import load_credential

            try:
                credential = load_credential(config.credential)
            except IdentityError as exc:
                raise CoordinationError(f"cannot read coordinator credential {config.credential}: {exc}",
                                        reason="invalid_config_file") from exc
        # -- [issuer]: the issuing key from the config unless given
        if issuer is None and config.issuer is not None:
            from sdk.coord.coordinator.enrollment import load_issuer_key

            issuer = load_issuer_key(config.issuer)
        kwargs.setdefault("issuer_config", config.issuer)
        # -- end [issuer]
        kwargs.setdefault("store_url", getattr(config, "store_url", None))   # [store] url
        kwargs.setdefault("status_republish", config.status_republish)
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
        expired, session_ended, offline, rejected, duplicate, store_behind."""
        self._listeners.append(listener)

    def register_command(self, type_: str, handler: CommandHandler) -> None:
        """Serve requests of ``type_`` on the coordinator's command topic with ``handler(msg)``.

        The handler returns the reply body (or an awaitable of it) and raises an
        :class:`~sdk.errors.AutoGLMError` with a ``reason`` to refuse; unknown senders are rate
        limited by the same gate as the handshake."""
        if type_ in (protocol.HELLO, protocol.PRESENT):
            raise ValueError(f"{type_} is the handshake's own request type")
        self.commands[type_] = handler

    # -- rule reload (SIGHUP in the CLI)
    def reload_rules(self, rules: RuleSet) -> None:
        """Swap in an already validated rule set; the next event is evaluated with it."""
        if not isinstance(rules, RuleSet):
            raise TypeError("rules must be a RuleSet (validate with load_rules / load_config first)")
        old, self.rules = self.rules, rules
        log.info("rules reloaded: %d rule(s), was %d", len(rules), len(old))
        self._emit("rules_reloaded", count=len(rules), previous=len(old))
    # -- end rule reload

    def _emit(self, what: str, /, **info: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(what, info)
            except Exception:
                log.exception("coordinator listener failed on %s", what)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Lock the data directory, open the store, connect, subscribe, announce presence and lists."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # -- data directory lock (one daemon per store): taken before the store opens
        self._lock.acquire()
        try:
            self.store = self._open_store()
        except BaseException:
            self._lock.release()
            raise
        # -- end data directory lock
        try:
            await self._start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.client.aclose()
            self.store.close()
            self.store = None
            self._lock.release()
            raise

    async def _start(self) -> None:
        assert self.store is not None
        for row in self.store.load_devices():
            try:
                self.registry.put(DeviceRecord.from_row(row, heartbeat_ttl=self.heartbeat_ttl))
            except (KeyError, TypeError, ValueError) as exc:
                log.error("device record %r in the store is unreadable (%s); skipped", row.get("did"), exc)
        load_operator_state(self)       # operator tags and reported properties (fleet_ops.py)
        # -- resumption tickets: the deployment id, and every device's latest ticket, from the store
        self.deployment = self.store.get_meta(_DEPLOYMENT)
        if self.deployment is None:
            self.deployment = secrets.token_hex(8)
            self.store.set_meta(_DEPLOYMENT, self.deployment)
        now = self.ticket_clock()
        restored = sum(1 for rec in self.registry
                       if rec.ticket is not None and rec.state != REVOKED
                       and self.challenges.restore(rec.did, rec.ticket[0], rec.ticket[1], now=now))
        if restored:
            log.info("%d resumption ticket(s) restored from the store", restored)
        # -- end resumption tickets
        for rec in self.registry:
            rec.persisted = self._stable(rec)
        if self.issuer is not None:
            self._load_issuer_state()
        await self.client.connect()
        await self.status_source.attach(self.client)
        await self.client.serve(protocol.device_commands(self._token), self._on_command, gate=self._gate,
                                qos=1)
        await self.client.subscribe(protocol.ALL_EVENTS, self._on_device_message, qos=1)
        # presence is state: each device's heartbeats, online and offline notes (its will too, signed
        # at connect) are each ordered by their signed iat; only known devices keep a floor
        await self.client.subscribe(protocol.ALL_PRESENCE, self._on_presence, qos=1,
                                    retained=Retained.STATE, order=_presence_order,
                                    senders=self._known_sender)
        self.client.transport.add_on_connect(self._on_reconnect)
        await self._announce()
        self._sweeper = asyncio.ensure_future(self._sweep_loop())
        self.rollouts.start()           # roll-outs: resumed from the store, gate tick started (rollouts.py)
        if self.metrics_port:
            from prometheus_client import start_http_server
            self._http = start_http_server(self.metrics_port, addr="127.0.0.1",
                                           registry=self.metrics.registry)
        self.started = True
        log.info("coordinator %s up (boot %s, %d known devices, %d rules)", self.did, self.boot,
                 len(self.registry), len(self.rules))

    def _open_store(self) -> Store:
        """Open the store; refuse one that is corrupt, or missing while other state says it existed."""
        # -- shared store: the data directory's files say nothing about it (no evidence check)
        if self.store_url is not None:
            from sdk.coord.coordinator.store import open_store

            shared = open_store(self.store_url, durability=self.durability, fresh=self.fresh)
            return shared if self.store_hook is None else self.store_hook(shared)
        # -- end shared store
        path = self.data_dir / "coordinator.db"
        store = Store(path, durability=self.durability, fresh=self.fresh)
        if store.created and not self.fresh:
            evidence = self._store_evidence()
            if evidence:
                store.close()
                with contextlib.suppress(OSError):
                    for suffix in ("", "-wal", "-shm"):
                        Path(f"{path}{suffix}").unlink(missing_ok=True)
                msg = (f"state store {path} is missing or empty but {evidence}; refusing to start "
                       "(devices would be rolled back). Restore it, or start fresh (--fresh)")
                log.error(msg)
                raise StoreMissing(msg)
        return store

    def _store_evidence(self) -> str | None:
        """Why the data directory shows a store existed before (None on a first start)."""
        if (self.data_dir / f"{_ISSUER_STATE_FILE}.migrated").exists():
            return "the issuer state was migrated into it"
        snapshot = self.data_dir / "status.json"
        try:
            devices = json.loads(snapshot.read_text(encoding="utf-8")).get("devices", [])
        except (OSError, ValueError, AttributeError):
            return None
        known = [d for d in devices if isinstance(d, dict) and d.get("desired_version")]
        if known:
            return f"the last status snapshot lists {len(known)} device(s) with config versions"
        return None

    async def stop(self) -> None:
        """Say offline (retained), stop tasks, close the store."""
        if not self.started:
            return
        self.started = False
        with contextlib.suppress(MessagingError, OSError):
            if self.client.connected:
                await self.client.publish(protocol.coordinator_presence(self._token),
                                          {"state": "offline", "boot": self.boot}, type=protocol.PRESENCE,
                                          retain=True, qos=1)
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
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
        self.device_writes.discard()    # admissions not yet written were never answered either
        self.rollouts.flush()           # roll-outs' counters and curves
        self.operators.flush()          # queued operator audit rows
        if self.store is not None:
            with contextlib.suppress(CoordinationError):
                self.store.save_devices(r.to_row() for r in self.registry)
            self.store.close()
        self._lock.release()        # data directory lock: released once the store is closed

    async def _announce(self) -> None:
        await self.client.publish(protocol.coordinator_presence(self._token),
                                  {"state": "online", "boot": self.boot, "deployment": self.deployment},
                                  type=protocol.PRESENCE, retain=True, qos=1)
        if self.issuer is not None and self._status_credential is not None:
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
    def _known(self, did: str) -> bool:
        """Admitted before and not revoked: not charged or limited as an unknown sender."""
        rec = self.registry.get(did)
        return rec is not None and rec.state != REVOKED

    def _gate(self, msg: Message) -> RejectedMessage | None:
        """Before any handshake work: a sender never admitted gets a small burst of requests
        (an operator with a cached grant is let through without any verification)."""
        if self._known(msg.sender) or (
                msg.type == protocol.OPERATE and self.operators.granted(msg.sender)) \
                or self.request_limiter.allow(msg.sender):
            return None
        self.metrics.auth.labels("rate_limited").inc()
        return RejectedMessage(f"too many handshake requests from {msg.sender}", reason="busy")

    async def _on_command(self, msg: Message) -> Any:
        try:
            if msg.type == protocol.HELLO:
                return self._hello(msg)
            if msg.type == protocol.PRESENT:
                return await self._present(msg)
            handler = self.commands.get(msg.type)
            if handler is not None:
                reply = handler(msg)
                return await reply if inspect.isawaitable(reply) else reply
        except AdmissionError as exc:
            self.metrics.auth.labels(exc.reason).inc()
            log.warning("admission refused for %s: %s: %s", msg.sender, exc.reason, exc)
            self._emit("refused", did=msg.sender, reason=exc.reason, message=str(exc))
            raise MessagingError(str(exc), reason=exc.reason) from exc
        except MessagingError:
            raise
        except AutoGLMError as exc:       # a typed refusal: its reason travels in the error reply
            raise MessagingError(str(exc), reason=exc.reason) from exc
        raise MessagingError(f"unknown command {msg.type!r}", reason="unknown_command")

    def _hello(self, msg: Message) -> dict[str, Any]:
        """Hand out a challenge; sign a presentation only for known devices or within the budget.

        A hello without ``nonce`` costs no signature: the coordinator's presentation then comes
        with the ``present`` reply (the device sends its nonce there)."""
        body = msg.body if isinstance(msg.body, dict) else {}
        nonce = body.get("nonce")
        if nonce is not None and (not isinstance(nonce, str) or not 8 <= len(nonce) <= 128):
            raise AdmissionError("hello needs a nonce of 8-128 characters", reason="malformed")
        known = self._known(msg.sender)
        reply: dict[str, Any] = {"boot": self.boot, "heartbeat_ttl": self.heartbeat_ttl}
        if nonce is not None and not known and not self.hello_budget.take():
            raise AdmissionError(busy_message(1.0), reason="busy")
        if not self.admission.begin(msg.sender, known=known):   # bounded in flight: come back later
            raise AdmissionError(busy_message(self.admission.retry_after()), reason="busy")
        if nonce is not None:
            reply["vp"] = present(self.credential, self.key, challenge=nonce, domain=msg.sender)
            self.admission.signed += 1
        reply["challenge"] = self.challenges.issue(msg.sender)
        return reply

    async def _present(self, msg: Message) -> dict[str, Any]:
        """Admit a device (its handshake slot, if it took one with a hello or a direct
        presentation, is released after)."""
        body = msg.body if isinstance(msg.body, dict) else {}
        direct = self.direct_admission and body.get("challenge") == msg.id
        # no hello took a slot: a direct presentation takes one, as a hello would
        if direct and not self.admission.begin(msg.sender, known=self._known(msg.sender)):
            raise AdmissionError(busy_message(self.admission.retry_after()), reason="busy")
        try:
            reply = await self._admit(msg, direct=direct)
        except BaseException:
            self.admission.finish(msg.sender)
            raise
        if not self.admission.finish(msg.sender):
            self.admission.resumed += 1         # by resumption ticket: no hello came first
            self.metrics.auth.labels("resumed").inc()
        elif direct:
            self.admission.direct += 1
            self.metrics.auth.labels("direct").inc()
        return reply

    async def _admit(self, msg: Message, *, direct: bool = False) -> dict[str, Any]:
        """Validate everything first, then commit record and session at once (the record is written
        with the other admissions of this loop turn, in one transaction, before the reply).

        ``direct``: the presentation's challenge is the id of the envelope that carries it, which
        the envelope checks have just proved fresh and never seen before from this sender (the
        replay cache), instead of a challenge this coordinator handed out."""
        assert self.store is not None
        body = msg.body if isinstance(msg.body, dict) else {}
        try:
            last = integer(body.get("last_version", 0), what="last_version")
            ttl = body.get("heartbeat_ttl")
            ttl = self.heartbeat_ttl if ttl is None else min(
                max(finite(ttl, what="heartbeat_ttl", minimum=0), MIN_TTL), MAX_TTL)
            caps = body.get("capabilities")
            if caps is not None and (not isinstance(caps, list) or len(caps) > _MAX_CAPABILITIES
                                     or not all(isinstance(c, str) and 0 < len(c) <= 128 for c in caps)):
                raise InvalidValue(f"capabilities must be a list of at most {_MAX_CAPABILITIES} names")
            attrs = body.get("attributes")
            if attrs is not None:
                _check_attributes(attrs)
        except InvalidValue as exc:
            raise AdmissionError(f"malformed admission request: {exc}", reason="malformed") from exc
        nonce = body.get("nonce")
        if nonce is not None and (not isinstance(nonce, str) or not 8 <= len(nonce) <= 128):
            raise AdmissionError("nonce must be 8-128 characters", reason="malformed")
        if direct:      # before any signature, as the challenge table is for a handed-out one
            check_addressed(body.get("vp"), challenge=msg.id, holder=msg.sender)
        else:
            self.challenges.consume(body.get("challenge"), msg.sender)
        admitted = check_presentation(body.get("vp"), challenge=body["challenge"], domain=self.did,
                                      trust=self.trust, status=self.checker, expected_holder=msg.sender)
        did = admitted.holder
        credential = dict(admitted.credential)
        fp = fingerprint(credential)
        old = self.registry.get(did)
        if old is not None and fp in old.revoked_credentials:
            raise AdmissionError("this credential was revoked", reason="revoked")
        valid_until = _valid_until(credential)
        session = Session(secrets.token_hex(8), credential, fp, valid_until)
        rec = self.registry.admission(did, admitted.subject, credential_id=admitted.credential_id,
                                      issuer=admitted.issuer, session=session, heartbeat_ttl=ttl,
                                      status=_status_entries(credential), capabilities=caps,
                                      attributes=attrs)
        ticket = self._issue_ticket(rec)
        try:
            row = rec.to_row()
            stable = self._stable(rec, row)
            if old is None or rec.persisted != stable:  # durable first: a failed write admits no one
                await self.device_writes.write(row)
                rec.persisted = stable
            latest = self.store.latest_version(did)
            if last > latest:
                latest = self._store_behind(did, last, latest)
        except CoordinationError as exc:
            raise AdmissionError(f"admission not recorded: {exc}", reason="busy") from exc
        old = self.registry.get(did)                    # as it is now, after the write
        if old is not None and fp in old.revoked_credentials:     # revoked while the row was written
            with contextlib.suppress(CoordinationError):
                self._persist(old, force=True)
            raise AdmissionError("this credential was revoked", reason="revoked")
        if old is not None and old.session is not None:
            old.session.sent = None                     # the previous session's pump stops
        self.request_limiter.forget(did)                # admitted: no longer limited as unknown
        self.registry.put(rec)
        session.sent = min(last, latest)
        if valid_until is not None:
            self._schedule_expiry(did, session)
        self.metrics.auth.labels("admitted").inc()
        self._dirty = True
        self._admitted_at = time.monotonic()
        self._emit("admitted", did=did, kind=rec.kind, last_version=last, latest=latest)
        if latest > last:
            asyncio.get_running_loop().call_soon(lambda: self._spawn(self._pump(did)))
        reply: dict[str, Any] = {"session": session.id, "boot": self.boot, "deployment": self.deployment,
                                 "heartbeat_ttl": ttl, "pending": max(0, latest - last),
                                 "direct": self.direct_admission}
        if ticket is not None:
            reply["next_challenge"], reply["ticket_ttl"] = ticket, RESUME_TTL
        if valid_until is not None:
            reply["valid_until"] = valid_until
        if nonce is not None:       # resumed, direct, or after a nonce-less hello: prove ourselves here
            reply["vp"] = present(self.credential, self.key, challenge=nonce, domain=did)
            self.admission.signed += 1
        return reply

    # -- resumption tickets: persisted (digest, expiry) with the record, renewed on request
    def _issue_ticket(self, rec: DeviceRecord) -> str | None:
        """A new ticket for ``rec`` (its digest and expiry set on the record, saved with it by the
        caller before the ticket is handed out); None when the challenges are at their limit."""
        try:
            ticket = self.challenges.issue(rec.did, ttl=RESUME_TTL)
        except AdmissionError as exc:                   # challenges at their limit: no ticket this time
            log.info("no resumption ticket for %s: %s", rec.did, exc)
            return None
        self.challenges.forget_restored(rec.did)        # the record's older ticket is replaced
        rec.ticket = (ticket_digest(ticket), self.ticket_clock() + RESUME_TTL)
        return ticket

    async def _renew_ticket(self, msg: Message) -> dict[str, Any]:
        """A ``coord.ticket`` request: an admitted device's fresh resumption ticket, at most one per
        ``TICKET_RENEW_INTERVAL`` (written with the loop turn's other records before the reply)."""
        rec = self.registry.get(msg.sender)
        if rec is None or not rec.admitted or (rec.session is not None and rec.session.expired()):
            raise AdmissionError("only an admitted device gets a resumption ticket", reason="not_admitted")
        wait = 0.0 if rec.ticket is None else rec.ticket[1] - RESUME_TTL + TICKET_RENEW_INTERVAL - self.ticket_clock()
        if wait > 0:                                    # bounded per device
            self.metrics.auth.labels("ticket_too_soon").inc()
            raise AdmissionError(busy_message(wait), reason="busy")
        previous = rec.ticket
        ticket = self._issue_ticket(rec)
        if ticket is None:
            raise AdmissionError(busy_message(1.0), reason="busy")
        try:
            await self.device_writes.write(rec.to_row())
        except CoordinationError as exc:
            rec.ticket = previous
            raise AdmissionError(f"ticket not recorded: {exc}", reason="busy") from exc
        rec.persisted = self._stable(rec)
        self.metrics.auth.labels("ticket_renewed").inc()
        return {"next_challenge": ticket, "ticket_ttl": RESUME_TTL, "deployment": self.deployment}
    # -- end resumption tickets

    def _store_behind(self, did: str, reported: int, latest: int) -> int:
        """A device is ahead of the store: say so loudly and continue after its version."""
        assert self.store is not None
        self.metrics.store_behind.inc()
        err = StoreBehind(f"state store is behind device {did}: it reports config v{reported}, the store "
                          f"holds v{latest} (store lost or restored from an old copy); new configs "
                          f"continue from v{reported + 1}")
        log.error("%s: %s", err.reason, err)
        self._emit("store_behind", did=did, reported=reported, stored=latest, error=err)
        self.store.advance(did, reported)
        return reported

    @staticmethod
    def _stable(rec: DeviceRecord, row: dict[str, Any] | None = None) -> str:
        """A digest of the record (``row``: its ``to_row()``, when made already) without its liveness
        fields, kept to skip saves that change nothing."""
        stable = {k: v for k, v in (rec.to_row() if row is None else row).items() if k != "last_seen"}
        return hashlib.blake2b(json.dumps(stable, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()

    def _save_device_rows(self, rows: list[dict[str, Any]]) -> None:
        assert self.store is not None
        self.store.save_devices(rows)

    def _persist(self, rec: DeviceRecord, *, force: bool = False) -> None:
        """Save a device record unless only its liveness fields changed since the last save."""
        assert self.store is not None
        stable = self._stable(rec)
        if force or rec.persisted != stable:
            self.store.save_devices([rec.to_row()])
            rec.persisted = stable

    # ------------------------------------------------------------------ device messages
    def _check_sender(self, msg: Message) -> DeviceRecord | None:
        """The sender's record when it is admitted and its session still valid, else None."""
        if msg.sender == self.did:
            return None
        rec = self.registry.get(msg.sender)
        if rec is None:
            self._reject(msg, "not_admitted")
            self._notify(msg.sender, protocol.NOTICE_REAUTH, "not_admitted")
            return None
        if msg.topic != protocol.device_events(rec.token):
            self._reject(msg, "wrong_topic_owner")
            return None
        if rec.session is not None and rec.session.expired():
            self._end_session(rec, "credential_expired")
        if not rec.admitted:
            reason = REVOKED if rec.state == REVOKED else "not_admitted"
            self._reject(msg, reason)
            self._notify(msg.sender, protocol.NOTICE_REVOKED if reason == REVOKED else protocol.NOTICE_REAUTH,
                         reason)
            return None
        self.registry.touch(rec.did)
        return rec

    def _reject(self, msg: Message, reason: str) -> None:
        self.metrics.rejected.labels(reason).inc()
        log.warning("rejected %s from %s on %s: %s", msg.type, msg.sender, msg.topic, reason)
        self._emit("rejected", did=msg.sender, type=msg.type, reason=reason)

    def _notify(self, did: str, notice: str, reason: str) -> None:
        rec = self.registry.get(did)
        now = time.monotonic()
        if rec is not None:
            if now - rec.notified_at < 0.5:   # at most two notices a second per known device
                return
            rec.notified_at = now
        elif not self.request_limiter.allow(did):     # unknown senders share the handshake limit
            return
        self._spawn(self._send_notice(did, notice, reason))

    async def _send_notice(self, did: str, notice: str, reason: str) -> None:
        with contextlib.suppress(MessagingError):
            await self.client.publish(protocol.device_commands(protocol.token(did)),
                                      {"notice": notice, "reason": reason}, type=protocol.NOTICE, qos=1)

    def _on_device_message(self, msg: Message) -> Awaitable[None] | None:
        """A device's event, report, announcement or properties. Only an event needs a task (the
        client runs the returned awaitable); the rest, a fan-out's 10,000 reports among them, are
        handled right here."""
        rec = self._check_sender(msg)
        if rec is None:
            return None
        if msg.type == protocol.REPORT:
            self._handle_report(msg)
        elif msg.type == protocol.EVENT:
            return self._handle_event(msg)
        elif msg.type == protocol.ANNOUNCE:
            self._handle_announce(msg, rec)
        elif msg.type == protocol.PROPERTIES:      # reported properties (fleet_ops.py)
            reason = handle_properties(self, msg, rec)
            if reason is not None:
                self._reject(msg, reason)
        else:
            self._reject(msg, "unknown_type")
        return None

    def _handle_announce(self, msg: Message, rec: DeviceRecord) -> None:
        body = msg.body if isinstance(msg.body, dict) else {}
        caps, attrs = body.get("capabilities"), body.get("attributes")
        try:
            if caps is not None and (not isinstance(caps, list) or len(caps) > _MAX_CAPABILITIES
                                     or not all(isinstance(c, str) and 0 < len(c) <= 128 for c in caps)):
                raise InvalidValue(f"capabilities must be a list of at most {_MAX_CAPABILITIES} names")
            if attrs is not None:
                _check_attributes(attrs)
        except InvalidValue as exc:
            log.warning("announcement from %s refused: %s", msg.sender, exc)
            self._reject(msg, "malformed")
            return
        self.registry.announce(msg.sender, capabilities=caps, attributes=attrs if isinstance(attrs, dict)
                               else None)
        try:
            self._persist(rec)
        except CoordinationError as exc:
            log.error("announcement from %s not persisted: %s", msg.sender, exc)
        self._dirty = True

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
        # -- rule roll-outs (rule_rollouts.py): rules with [rules.rollout] start a staged roll-out
        if not await start_rule_rollouts(self, msg.sender, event_id, actions):
            return                              # not acknowledged: the device sends it again
        actions = [a for a in actions if a.rollout is None]
        # -- end rule roll-outs
        # -- model-made configs (model_policy.py): decided off the event path, committed when advised
        if self.model_policy.defer(self, msg, event, event_id, actions, t0):
            return
        # -- end model-made configs
        await self.commit_actions(msg, event, event_id, actions, t0)

    async def commit_actions(self, msg: Message, event: Event, event_id: str, actions: list[Any], t0: float,
                            *, origins: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Merge the actions per device, commit them with the event in one transaction, push, ack;
        ``origins`` (per DID) records how model-policy versions were made."""
        assert self.store is not None
        merged: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {}
        for action in actions:
            for did in action.targets:
                changes, rules = merged.get(did, ({}, ()))
                merged[did] = ({**changes, **action.changes}, (*rules, action.rule))
        merged = drop_pinned(self.store, merged)        # keys an operator set stay as set
        kept = {d: o for d, o in (origins or {}).items() if d in merged}
        try:
            versions = self.store.commit(merged, event_id=event_id,
                                         event=(msg.sender, event.type, event.fields),
                                         max_bytes=MAX_CONFIG_BYTES, origins=kept or None)
        except InvalidValue as exc:            # the rules' output can never be signed: refuse the event
            err = RuleOutputError(f"event {event_id} ({event.type}) from {msg.sender}: rule(s) "
                                  f"{sorted({r for _, rs in merged.values() for r in rs})} produced a config "
                                  f"that cannot be committed: {exc}")
            log.error("%s; nothing committed", err)
            self._reject(msg, err.reason)
            self._ack(msg.sender, event_id, protocol.ACK_REJECTED, err.reason)
            return
        except CoordinationError as exc:       # not acknowledged: the device sends it again
            log.error("event %s from %s not committed: %s", event_id, msg.sender, exc)
            return
        if merged and not versions:            # processed meanwhile (dedup inside the transaction)
            self._ack(msg.sender, event_id, protocol.ACK_DUPLICATE)
            return
        self.metrics.event(event.type)
        self._emit("event", did=msg.sender, event_id=event_id, type=event.type, fields=event.fields,
                   targets=sorted(merged))
        if not merged:
            self._ack(msg.sender, event_id, protocol.ACK_PROCESSED)
            return
        self.metrics.event_work(time.perf_counter() - t0)        # rules + durable commit
        await self.push_desired(event_id, versions)
        self._ack(msg.sender, event_id, protocol.ACK_PROCESSED)

    async def push_desired(self, event_id: str, versions: list[ConfigVersion], *, wait: bool = True) -> None:
        """Push newly committed versions (rule-made or an operator's): count them into convergence,
        then run the targets' pumps (each version signed for its device), at most
        :data:`PUMP_CONCURRENCY` at once; ``wait=False`` returns once the pumps are started."""
        if not versions:
            return
        self.metrics.start(event_id, {c.did: c.version for c in versions})
        self._dirty = True
        self._push_at = self._reports_at = time.monotonic()  # its reports are about to arrive
        self._emit("committed", event_id=event_id, versions={c.did: c.version for c in versions})
        pumps = self._pump_all(versions)
        if wait:
            await pumps
        else:
            self._spawn(pumps)

    async def _pump_all(self, versions: list[ConfigVersion]) -> None:
        """Every target's pump, :data:`PUMP_CONCURRENCY` workers taking the next target in turn (a
        fan-out to 10,000 devices holds 256 tasks and acknowledgement timers, not 10,000);
        a pump that raises does not stop the others, and the first error is raised at the end."""
        targets = iter(versions)
        errors: list[BaseException] = []

        async def worker() -> None:
            for cv in targets:
                try:
                    await self._pump(cv.did, cv)
                except Exception as exc:  # noqa: BLE001 - the other targets still get theirs
                    errors.append(exc)

        await asyncio.gather(*(worker() for _ in range(min(PUMP_CONCURRENCY, len(versions)))))
        if errors:
            raise errors[0]

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
        status = body.get("status")
        try:
            version = integer(body.get("version"), what="version", minimum=1)
            apply_ms = body.get("apply_ms")
            apply_ms = None if apply_ms is None else finite(apply_ms, what="apply_ms", minimum=0)
        except InvalidValue as exc:
            log.warning("report from %s refused: %s", msg.sender, exc)
            self._reject(msg, "malformed")
            return
        if status not in (protocol.APPLIED, protocol.FAILED):
            self._reject(msg, "malformed")
            return
        if version > self.store.latest_version(msg.sender):
            self._reject(msg, "unknown_version")
            return
        reason = body.get("reason") if isinstance(body.get("reason"), str) else None
        self._reports.append((msg.sender, version, status, reason[:256] if reason else None, apply_ms))
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
        self._reports_at = time.monotonic()
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

    def _known_sender(self, did: str) -> bool:
        return did in self.registry and did != self.did

    def _on_presence(self, msg: Message) -> None:
        if msg.sender == self.did:
            return
        rec = self.registry.get(msg.sender)
        if rec is None or msg.topic != protocol.device_presence(rec.token):
            return
        body = msg.body if isinstance(msg.body, dict) else {}
        if rec.session is not None and rec.session.expired():
            self._end_session(rec, "credential_expired")
        if msg.type == protocol.HEARTBEAT:
            if rec.admitted:
                self.registry.touch(rec.did)
            elif rec.state != REVOKED and not msg.retained:
                self._notify(msg.sender, protocol.NOTICE_REAUTH, "not_admitted")
        elif msg.type == protocol.PRESENCE and body.get("state") == "offline" and rec.admitted \
                and not msg.retained:
            self.registry.set_state(msg.sender, OFFLINE)
            self._dirty = True
            log.info("device %s offline (%s)", msg.sender, body.get("reason", "?"))
            self._emit("offline", did=msg.sender, reason=body.get("reason"))

    # ------------------------------------------------------------------ config push
    async def _pump(self, did: str, known: ConfigVersion | None = None) -> None:
        """Send ``did`` every committed version it has not been sent, in order (one pump per device)."""
        assert self.store is not None
        rec = self.registry.get(did)
        if rec is None:
            return
        owner = rec                 # the record whose lock this pump takes (rec may be replaced)
        try:
            async with owner.take_lock():
                while True:
                    rec = self.registry.get(did)
                    session = rec.session if rec is not None else None
                    if rec is None or session is None or not rec.admitted or session.sent is None:
                        return
                    if session.expired():
                        self._end_session(rec, "credential_expired")
                        return
                    sent = session.sent
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
                            await self.client.publish(protocol.device_config(rec.token), body,
                                                      type=protocol.CONFIG, qos=1)
                        except MessagingError as exc:
                            log.warning("config v%d to %s not sent (%s); it goes out on reconnect",
                                        cv.version, did, exc.reason)
                            session.sent = None
                            return
                        if (self.registry.get(did) is not rec or rec.session is not session
                                or session.sent is None):
                            return          # offline, expired, or re-admitted meanwhile (its own pump follows)
                        session.sent = cv.version
                        self.metrics.config_sent(len(strict_dumps(body)))
        finally:
            owner.pump_done()

    # ------------------------------------------------------------------ session ends
    def _end_session(self, rec: DeviceRecord, reason: str) -> None:
        """End ``rec``'s session because its credential expired; the device is told (``expired``
        notice) and re-authenticates if it holds a fresh credential."""
        if rec.session is None:
            return
        self.registry.set_state(rec.did, EXPIRED)
        self.metrics.sessions_ended.labels(reason).inc()
        self._dirty = True
        with contextlib.suppress(CoordinationError):
            self._persist(rec)
        log.warning("device %s: session ended (%s); it must re-authenticate with a valid credential",
                    rec.did, reason)
        rec.notified_at = 0.0
        self._notify(rec.did, protocol.NOTICE_EXPIRED, reason)
        self._emit("session_ended", did=rec.did, reason=reason)

    def _schedule_expiry(self, did: str, session: Session) -> None:
        assert session.valid_until is not None
        heapq.heappush(self._deadlines, (session.valid_until, did, session.id))
        if len(self._deadlines) > 2 * len(self.registry) + 64:
            # replaced sessions leave their deadlines behind (re-admissions): rebuild from the live
            # ones once they are half the heap, amortized O(1) per admission
            self._deadlines = [(r.session.valid_until, r.did, r.session.id) for r in self.registry
                               if r.session is not None and r.session.valid_until is not None]
            heapq.heapify(self._deadlines)
            self._arm_expiry()
        elif self._deadlines[0][2] == session.id:
            self._arm_expiry()

    def _arm_expiry(self) -> None:
        """One timer for the earliest credential deadline of all sessions."""
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if not self._deadlines:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._deadlines[0][0] - time.time())
        self._expiry_timer = loop.call_at(loop.time() + delay, self._expire_due)

    def _expire_due(self, now: float | None = None) -> list[str]:
        """End every session whose credential is past its validUntil; returns their DIDs."""
        self._expiry_timer = None
        now = time.time() if now is None else now
        ended = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, did, sid = heapq.heappop(self._deadlines)
            rec = self.registry.get(did)
            if rec is not None and rec.session is not None and rec.session.id == sid:
                self._end_session(rec, "credential_expired")
                ended.append(did)
        with contextlib.suppress(RuntimeError):        # no loop: called from a synchronous sweep
            self._arm_expiry()
        return ended

    # ------------------------------------------------------------------ revocation
    def _on_status_list(self, url: str, credential: Any) -> None:
        """A newer status list was accepted: end the sessions of devices it revokes."""
        if self.status_source.store is None:       # a checker of its own: push the list to it
            try:
                self.checker.update(url, credential)
            except IdentityError as exc:
                log.warning("status list %s rejected: %s", url, exc)
                return
        for rec in self.registry.with_status_list(url):      # indexed by list URL: no fleet scan
            if rec.state == REVOKED:
                continue
            entries = [e for e in rec.status if e.get("statusListCredential") == url]
            if not entries:
                continue
            try:
                self.checker.check(entries if len(entries) > 1 else entries[0], issuer=rec.issuer)
            except IdentityError as exc:
                if exc.reason in ("revoked", "suspended"):
                    self._revoke_session(rec, exc.reason)

    def _revoke_session(self, rec: DeviceRecord, reason: str) -> None:
        """Mark ``rec`` revoked for good (its credential is never admitted again) and tell it."""
        self.registry.revoke(rec.did, [f for f in (rec.fingerprint, rec.credential_id) if f])
        try:
            self._persist(rec)
        except CoordinationError as exc:
            log.error("revocation of %s not persisted: %s", rec.did, exc)
        self.metrics.sessions_ended.labels("revoked").inc()
        self._dirty = True
        log.warning("device %s %s: disconnected from coordination", rec.did, reason)
        rec.notified_at = 0.0
        self._notify(rec.did, protocol.NOTICE_REVOKED, reason)
        self._emit("revoked", did=rec.did, reason=reason)

    # -- the coordinator as an issuer (demo, small deployments); its state lives in the store
    def _load_issuer_state(self) -> None:
        assert self.issuer is not None and self.store is not None
        if self.store.get_meta(_ISSUER_MIGRATED) is None:
            self._migrate_issuer_file()
        self._status_list = StatusList(self.status_list_size)
        for index in self.store.revoked_indexes():
            if 0 <= index < self.status_list_size:
                self._status_list.set(index)
        self._resign_status_list()

    def _migrate_issuer_file(self) -> None:
        """Import a legacy ``issuer-state.json`` into the store once (then renamed ``.migrated``)."""
        assert self.store is not None
        path = self.data_dir / _ISSUER_STATE_FILE
        if not path.exists():
            self.store.set_meta(_ISSUER_MIGRATED, "none")
            return
        try:
            state = strict_json.loads(path.read_bytes())
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
            self.store.import_issuer_state(state, marker=_ISSUER_MIGRATED)
        except (OSError, ValueError, InvalidValue) as exc:
            if not self.fresh:
                msg = f"issuer state {path} is unreadable ({exc}); fix it, or start fresh (--fresh)"
                log.error(msg)
                raise StoreCorrupt(msg, reason="issuer_state_corrupt") from exc
            log.warning("issuer state %s unreadable (%s); starting fresh without it", path, exc)
            self.store.set_meta(_ISSUER_MIGRATED, "discarded")
            os.replace(path, path.with_name(f"{path.name}.corrupt"))
            return
        os.replace(path, path.with_name(f"{path.name}.migrated"))
        log.info("issuer state %s migrated into the state store", path)

    def _resign_status_list(self) -> None:
        assert self.issuer is not None and self._status_list is not None
        url = protocol.status_list_url(self.issuer.did)
        cred = create_status_list_credential(self.issuer, url, status_list=self._status_list)
        assert isinstance(cred, dict)
        self._status_credential = cred
        self._status_signed = time.monotonic()
        if not self.status_source.put(url, cred):
            log.error("own status list %s not taken by the status source", url)

    def _status_get(self, msg: Message) -> dict[str, Any]:
        """A ``STATUS_GET`` request: the issuer's current status list, if that is the one asked for."""
        body = msg.body if isinstance(msg.body, dict) else {}
        cred = self._status_credential
        if cred is None or body.get("url") != cred.get("id"):
            raise MessagingError(f"no status list {body.get('url')!r} published here", reason="unknown_status_list")
        return cred

    async def _publish_status_list(self) -> None:
        assert self._status_credential is not None
        await publish_status_list(self.client, self._status_credential)

    def issue_device_credential(self, did: str, *, kind: str, groups: Iterable[str] = (),
                                capabilities: Iterable[str] = (), name: str | None = None,
                                valid_for: float = 365 * 86400) -> dict[str, Any]:
        """Issue a revocable DeviceCredential with the coordinator's issuer key."""
        entry = self.status_entry_for(did)
        assert self.issuer is not None
        return device_credential(self.issuer, did, kind=kind, groups=groups, capabilities=capabilities,
                                 name=name, status=entry, valid_for=valid_for)

    def status_entry_for(self, did: str) -> dict[str, Any]:
        """A fresh entry in the issuer's status list, recorded against ``did``: put it in any other
        credential issued to that DID with the issuer key (an ``InferenceAccessCredential`` for the
        mesh, say) and :meth:`revoke` / ``device.revoke`` of the DID revokes that credential too."""
        if self.issuer is None:
            raise CoordinationError("this coordinator has no issuer key", reason="not_issuer")
        if self.store is None:
            raise CoordinationError("start the coordinator before issuing credentials", reason="not_started")
        from sdk.identity.status_ledger import OFFLINE_RANGE  # left to offline issuance (autoglm vc issue)

        index = self.store.allocate_coordinator_index(did, reserved=OFFLINE_RANGE)
        if index >= self.status_list_size:
            raise CoordinationError("the status list is full", reason="status_list_full")
        return dict(status_entry(protocol.status_list_url(self.issuer.did), index))

    async def revoke(self, did: str, *, indexes: Iterable[int] = ()) -> None:
        """Revoke every credential this coordinator issued to ``did`` (and ``indexes`` of its list, e.g.
        from a credential issued offline): update, publish, disconnect."""
        if self.issuer is None or self._status_list is None or self.store is None:
            raise CoordinationError("this coordinator has no issuer key", reason="not_issuer")
        extra = {int(i) for i in indexes if 0 <= int(i) < self.status_list_size}
        indexes = sorted(set(self.store.issued_indexes(did)) | extra)
        if not indexes:
            raise CoordinationError(f"no credential issued to {did}", reason="unknown_device")
        self.store.revoke_indexes(indexes)             # durable before anyone is told
        for index in indexes:
            self._status_list.set(index)
        self._resign_status_list()          # listeners apply it locally at once
        await self._publish_status_list()

    # ------------------------------------------------------------------ expiry and status
    async def _sweep_loop(self) -> None:
        last_write = 0.0
        while True:
            await asyncio.sleep(self.sweep_interval)
            self.sweep()
            if self._status_list is not None and time.monotonic() - self._status_signed > STATUS_REFRESH:
                self._resign_status_list()             # re-signed well before its validUntil
                with contextlib.suppress(MessagingError):
                    await self._publish_status_list()
            elif self._status_credential is not None and self.status_republish \
                    and time.monotonic() >= self._status_republish_at:
                self._status_republish_at = time.monotonic() + republish_delay(self.status_republish)
                with contextlib.suppress(MessagingError):
                    await self._publish_status_list()
            now = time.monotonic()
            # on change, at most once a second, and never more than 5 % of the loop's time; while a
            # large push converges (reports arriving: every row changes with each) at most every
            # STATUS_BUSY_INTERVAL from the push's start (a push left waiting on devices that are
            # away does not count), and as often while a large fleet is being admitted (a storm)
            interval = max(1.0, 20 * self._status_cost)
            since = last_write
            if self._status_cost > 0.02:
                converging = bool(self.metrics.pending) and now - self._reports_at < 2.0
                if converging or now - self._admitted_at < 2.0:
                    interval = max(interval, STATUS_BUSY_INTERVAL)
                if converging:
                    since = max(since, self._push_at)
            if self._dirty and now - since >= interval:
                last_write = now
                self._write_status()

    def sweep(self, now: float | None = None) -> list[str]:
        """Expire devices whose heartbeat TTL lapsed; returns their DIDs."""
        expired = []
        lapsed = self.registry.expired(now)        # only the deadlines that came due (a heap)
        for rec in lapsed:
            self.registry.set_state(rec.did, EXPIRED)
            expired.append(rec.did)
            log.info("device %s expired (no heartbeat for %.1fs)", rec.did, rec.heartbeat_ttl)
            self._emit("expired", did=rec.did)
        if expired and self.store is not None:
            try:
                self.store.save_devices(r.to_row() for r in lapsed)
            except CoordinationError as exc:
                log.error("expiry of %d device(s) not persisted: %s", len(expired), exc)
            self._dirty = True
        self._expire_due(now)
        tick = time.monotonic()
        if tick - self._challenges_swept >= 10.0:       # bounded by its limit meanwhile
            self._challenges_swept = tick
            self.challenges.sweep()
        counts = self.registry.counts()              # kept on every transition
        fit_caches(len(self.registry))      # the did:key cache grows with the fleet (fleet_caches.py)
        for state in (ONLINE, OFFLINE, EXPIRED, REVOKED):
            self.metrics.devices.labels(state).set(counts.get(state, 0))
        return expired

    def status(self) -> dict[str, Any]:
        """Devices (with desired/reported versions and delta) and adaptation metrics, computed afresh
        (``status.json`` holds the same, rendered incrementally)."""
        devices = []
        for rec in sorted(self.registry, key=lambda r: (r.kind, r.did)):
            row = rec.to_row()
            row.pop("ticket", None)                     # resumption tickets stay in the store
            if self.store is not None:
                row.update(self._store_fields(rec.did))
            devices.append(row)
        return {"coordinator": self.did, "boot": self.boot, "broker": self.broker, "updated": time.time(),
                "devices": devices, "metrics": self.metrics.summary()}

    def _store_fields(self, did: str) -> dict[str, Any]:
        assert self.store is not None
        rep = self.store.reported(did)
        desired = self.store.desired(did)
        return {"desired_version": self.store.latest_version(did), "reported_version": rep.version,
                "report_status": rep.status, "delta": store_delta(desired, rep.state)}

    def status_json(self) -> str:
        """:meth:`status` as compact JSON, re-rendering only the devices that changed since the last
        call (registry and store both report what changed); the rest is joined from cache."""
        return "".join(self._status_chunks())

    def _status_chunks(self) -> Iterable[str]:
        """:meth:`status_json` in pieces (the file is written from them: no fleet-sized string)."""
        changed = self.registry.drain_changed()
        touched = self.store.drain_touched() if self.store is not None else set()
        for did in changed | touched:
            rec = self.registry.get(did)
            if rec is None:
                self._status_rows.pop(did, None)
                self._status_store.pop(did, None)
                self._status_order = None
                continue
            row = rec.to_row()
            row.pop("ticket", None)                     # resumption tickets stay in the store
            if self.store is not None and (did in touched or did not in self._status_store):
                # equal fields (most of a fleet: same versions, no delta) are one interned string
                text = _compact(self._store_fields(did))
                self._status_store[did] = sys.intern("," + text[1:-1])
            old = self._status_rows.get(did)
            if old is None or old[0] != rec.kind:
                self._status_order = None
            for k in _STATUS_OWN_FIELDS:
                row.pop(k, None)
            shared_text = _compact(row)
            self._status_rows[did] = (rec.kind, sys.intern("," + shared_text[1:-1]) if len(shared_text) > 2 else "")
        if self._status_order is None:
            rows = self._status_rows
            self._status_order = sorted(rows, key=lambda d: (rows[d][0], d))
        head = json.dumps({"coordinator": self.did, "boot": self.boot, "broker": self.broker,
                           "updated": time.time()}, separators=(",", ":"))
        summary = json.dumps(self.metrics.summary(), default=str, separators=(",", ":"))
        yield f'{head[:-1]},"devices":['
        rows, parts, registry = self._status_rows, self._status_store, self.registry
        sep = ""
        for did in self._status_order:
            rec = registry.get(did)
            if rec is None:                 # removed since the rows were brought up to date
                continue
            yield sep + _status_own_json(rec)[:-1]
            sep = ","
            yield rows[did][1]
            yield parts.get(did, "")
            yield "}"
        yield f'],"metrics":{summary}}}'

    def _write_status(self) -> None:
        self._dirty = False
        t0 = time.perf_counter()
        try:
            path = self.data_dir / "status.json"
            tmp = path.with_suffix(".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                f.writelines(self._status_chunks())
            os.replace(tmp, path)
        except (OSError, CoordinationError) as exc:
            log.warning("could not write status snapshot: %s", exc)
        self._status_cost = time.perf_counter() - t0


_quote = json.encoder.encode_basestring_ascii      # what json.dumps writes for a str
_compact = json.JSONEncoder(default=str, separators=(",", ":")).encode   # built once, not per call

#: a status row's fields that are the device's own; the rest (kind, groups, capabilities, issuer,
#: state, validity...) is one JSON fragment shared by every device with the same values
_STATUS_OWN_FIELDS = ("did", "name", "attributes", "credential_id", "last_seen", "first_seen", "status",
                      "fingerprint")


def _json_str(value: Any) -> str:
    return _quote(value) if isinstance(value, str) else _compact(value)


def _json_seconds(value: Any) -> str:
    return float.__repr__(value) if type(value) is float and math.isfinite(value) else _compact(value)


def _status_own_json(rec: DeviceRecord) -> str:
    """The JSON of ``rec``'s own status fields (as ``json.dumps`` of those of
    :meth:`DeviceRecord.to_row`, compact), rendered per write: kept, they would be the largest
    per-device string in the coordinator."""
    attrs, status = rec.attributes, rec.status
    return "".join((
        '{"did":', _json_str(rec.did), ',"name":', _json_str(rec.name),
        ',"attributes":', _compact(attrs) if attrs else "{}",
        ',"credential_id":', _json_str(rec.credential_id),
        ',"last_seen":', _json_seconds(rec.last_seen), ',"first_seen":', _json_seconds(rec.first_seen),
        ',"status":', _compact(status) if status else "[]",
        ',"fingerprint":', _json_str(rec.fingerprint), "}"))


def _presence_order(msg: Message) -> tuple[Hashable, Any] | None:
    """``(key, version)`` of a presence-topic message: heartbeats, online and offline notes are
    each ordered by the envelope's signed ``iat`` (then id), so a replayed or re-delivered copy
    is never newer, while a will signed at connect still counts after the session's live notes."""
    body = msg.body if isinstance(msg.body, dict) else {}
    if msg.type == protocol.HEARTBEAT:
        key = "heartbeat"
    elif msg.type == protocol.PRESENCE and body.get("state") in ("online", "offline"):
        key = f"presence:{body['state']}"
    else:
        return None
    return key, (msg.issued_at, msg.id)


def _check_attributes(attrs: Any) -> None:
    if not isinstance(attrs, dict):
        raise InvalidValue("attributes must be an object")
    check_json(attrs, what="attributes", max_depth=8)
    if len(strict_dumps(attrs)) > _MAX_ATTRIBUTES_BYTES:
        raise InvalidValue(f"attributes exceed {_MAX_ATTRIBUTES_BYTES} bytes")


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
    from sdk.identity import load_key as load_identity_key

    passphrase = os.environ.get(config.passphrase_env)
    if passphrase is None:
        raise CoordinationError(f"set ${config.passphrase_env} to the keystore passphrase",
                                reason="invalid_config_file")
    return load_identity_key(config.keystore, passphrase=passphrase)


__all__ = ["Coordinator", "load_key", "fingerprint", "COORDINATOR_CREDENTIAL", "MAX_CONFIG_BYTES", "MAX_INT"]
