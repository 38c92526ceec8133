"""Asyncio MQTT transport over paho-mqtt 2.x: the broker connection, nothing above it.

Contract (what the envelope / secure client layer builds on):

* ``MqttTransport(url_or_config, **overrides)`` lives in ``async with`` (or ``connect()`` /
  ``aclose()``); reusable after close, not re-entrant. All methods must be called from the
  event loop that connected it.
* URL: ``mqtt://[user[:password]@]host[:port][?query]`` (default port 1883) or ``mqtts://``
  (TLS, default port 8883). Query keys: ``protocol=auto|5|3.1.1`` (default ``auto``: try MQTT 5,
  fall back to 3.1.1 when the broker answers "unsupported protocol version", closes, or stays
  silent for ``probe_timeout`` — amqtt misparses MQTT 5 CONNECTs with credentials and never
  answers; the result is cached per host:port for the process), ``client_id``,
  ``keepalive``, ``persistent=1``, ``ca``, ``cert``, ``key``, ``insecure=1``.
* ``await publish(topic, payload, qos=..., retain=...)`` returns once the broker acknowledged
  the message (PUBACK for QoS 1, PUBCOMP for QoS 2) or, for QoS 0, once it is queued on the
  socket. While the connection is down QoS 1/2 publishes wait in paho's session state and are
  sent after reconnect; QoS 0 publishes raise :class:`NotConnected`. More than ``max_pending``
  unacknowledged publishes raise :class:`SendQueueFull` (reason ``queue_full``) at once, or with
  ``queue_wait`` > 0 wait (first come, first served) up to that many seconds for room first.
* ``await subscribe(filter, qos=..., handler=None)`` awaits the SUBACK. Messages are delivered
  to the subscription's ``handler`` if it matches, else to ``on_message``, else to the bounded
  queue read with ``async for msg in transport.messages()`` (reading pauses, no message lost,
  while that queue is full). A handler/callback has the signature
  ``on_message(topic: str, payload: bytes, *, retain: bool, qos: int)`` and may be sync or async.
* Reconnect is automatic with jittered exponential backoff (:func:`backoff_delay`: ``full``
  jitter by default, ``decorrelated`` or ``none``; base ``backoff_min``, cap ``backoff_max``), so
  a broker restart does not make every client retry in lock-step; subscriptions are restored (skipped when the
  broker reports a persistent session present) and then every ``on_connect`` hook runs, so
  upper layers can re-announce presence. A callable password is called with the client id before
  every CONNECT (fresh DID proofs for the embedded broker).
* ``persistent=True`` asks for a session that outlives the connection (MQTT 5: clean start off
  plus ``session_expiry`` seconds; 3.1.1: clean session off) with a stable client id, so QoS 1
  messages survive client reconnects and broker restarts (if the broker persists sessions).
* Broker failover: ``target`` may be a list of URLs or one comma-separated string (the nodes
  of a clustered broker; the first URL's options apply to all, and all use the same scheme).
  ``connect()`` tries each in turn; on loss of the connection the transport moves to the next URL
  (round-robin) with the jittered backoff below, and re-subscribes (a clean session on another
  node). :attr:`MqttTransport.broker_url` is the URL in use.
* Timers are O(1) per client per interval: one shared ticker per event loop looks at each
  connection when its keepalive may fall due (a wheel of one-second slots; no task or timer per
  connection, and no per-second work per idle connection).
* TCP_NODELAY is set on every socket (paho does not; without it a round trip costs 40+ ms).
* Errors are subclasses of ``sdk.messaging.errors.TransportError`` with stable ``reason`` codes.

Implementation: paho runs on the asyncio loop itself (socket callbacks drive ``add_reader`` /
``add_writer``, as aiomqtt does); paho callbacks only resolve futures or feed the queue. Latency:
a lone publish is written at once (the first of a loop turn: what other tasks queue later in the
same turn leaves in one corked write after it); acks for what was just read are written after
the tasks those messages woke (one write per read batch); the first message after a quiet
spell is handed over before anything queued behind it is parsed (a busy socket is read in
batches). A plain TCP socket is handed to paho as a
:class:`~sdk.messaging.buffered_socket.BufferedSocket` (one ``recv`` for what paho reads a byte
at a time, one ``send`` per flush); a TLS socket is corked instead. paho's per-packet ``Properties`` share their constant tables
(:func:`sdk.messaging.paho_internals.share_property_tables`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import ipaddress
import logging
import math
import random
import secrets
import socket
import ssl
import threading
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, cast
from urllib.parse import parse_qs, unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from sdk.messaging import paho_internals as _paho
from sdk.messaging.buffered_socket import BufferedSocket
from sdk.messaging.errors import (
    ConnectFailed,
    ConnectionLost,
    NotConnected,
    PublishFailed,
    PublishTimeout,
    SendQueueFull,
    SubscribeFailed,
    TransportError,
)
from sdk.messaging.topics import matches as topic_matches

log = logging.getLogger(__name__)
_paho.share_property_tables()  # paho builds a Properties per PUBLISH/PUBACK read: share its tables
_paho.share_publish_conditions()  # paho builds a threading.Condition per message sent or read: share one

Protocol = Literal["auto", "5", "3.1.1"]
Password = str | bytes | Callable[[str], str | bytes] | None
MessageCallback = Callable[..., Any]
Jitter = Literal["full", "decorrelated", "none"]
ConnectHook = Callable[[bool], Awaitable[None] | None]

#: (host, port) → the protocol that broker accepted, so "auto" probes each broker once per process.
_NEGOTIATED: dict[tuple[str, int], Literal["5", "3.1.1"]] = {}
_READ_BATCH = 256
_CORK: int | None = getattr(socket, "TCP_CORK", None)
_UNSUPPORTED_PROTOCOL = 0x84  # MQTT 5 reason code; paho maps the 3.1.1 CONNACK code 1 onto it
_AUTH_CODES = {0x86: "bad_credentials", 0x87: "not_authorized", 0x8C: "not_authorized"}


def backoff_delay(attempt: int, *, base: float, cap: float, jitter: Jitter = "full",
                  previous: float | None = None, rng: Callable[[], float] = random.random) -> float:
    """The delay before retry number ``attempt`` (0 = the first retry).

    Bounds: ``none`` is ``min(cap, base * 2**attempt)``; ``full`` is uniform in
    ``[0, min(cap, base * 2**attempt)]``; ``decorrelated`` is uniform in
    ``[base, min(cap, 3 * previous)]`` (``previous`` the last delay, ``base`` at first) and
    never above ``cap``. ``rng`` returns floats in ``[0, 1)``.
    """
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if not 0 < base <= cap:
        raise ValueError("backoff needs 0 < base <= cap")
    if jitter == "decorrelated":
        prev = base if previous is None else max(base, previous)
        high = min(cap, prev * 3)
        return base + (high - base) * rng()
    ceiling = cap if attempt >= 64 else min(cap, base * 2 ** attempt)
    if jitter == "none":
        return ceiling
    if jitter == "full":
        return ceiling * rng()
    raise ValueError(f"jitter must be 'full', 'decorrelated' or 'none', not {jitter!r}")


class Backoff:
    """Successive :func:`backoff_delay` values for one retry loop; :meth:`reset` after a success."""

    __slots__ = ("attempt", "base", "cap", "jitter", "previous", "rng")

    def __init__(self, base: float, cap: float, jitter: Jitter = "full", *,
                 rng: Callable[[], float] = random.random) -> None:
        backoff_delay(0, base=base, cap=cap, jitter=jitter, rng=rng)  # validates the settings
        self.base, self.cap, self.jitter, self.rng = base, cap, jitter, rng
        self.attempt = 0
        self.previous: float | None = None

    def next(self) -> float:
        """The next delay (and count the attempt)."""
        delay = backoff_delay(self.attempt, base=self.base, cap=self.cap, jitter=self.jitter,
                              previous=self.previous, rng=self.rng)
        self.attempt += 1
        self.previous = delay
        return delay

    def reset(self) -> None:
        self.attempt = 0
        self.previous = None


class _Ticker:
    """One timer per event loop for the keepalive bookkeeping of every registered connection.

    A wheel of :attr:`INTERVAL` (one-second) slots: each connection sits in the slot of the next
    moment its keepalive could fall due (its last traffic plus the keepalive, or a ping's answer
    deadline), and is looked at only then; traffic meanwhile moves that moment on, and the
    connection simply goes back in.
    10,000 idle connections with a 30 s keepalive cost about 330 checks a second, not 10,000."""

    INTERVAL = 1.0

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._members: weakref.WeakSet[MqttTransport] = weakref.WeakSet()
        self._slots: dict[int, list[weakref.ref[MqttTransport]]] = {}
        self._due: weakref.WeakKeyDictionary[MqttTransport, int] = weakref.WeakKeyDictionary()
        self._handle: asyncio.TimerHandle | None = None

    def add(self, transport: MqttTransport) -> None:
        self._members.add(transport)
        self._place(transport, time.monotonic() + self.INTERVAL)
        if self._handle is None:
            self._handle = self._loop.call_later(self.INTERVAL, self._run)

    def discard(self, transport: MqttTransport) -> None:
        self._members.discard(transport)
        self._due.pop(transport, None)

    def _place(self, transport: MqttTransport, due: float) -> None:
        slot = math.ceil(due / self.INTERVAL)
        if self._due.get(transport) == slot:
            return
        self._due[transport] = slot           # an earlier placement in another slot is skipped
        self._slots.setdefault(slot, []).append(weakref.ref(transport))

    def _run(self) -> None:
        self._handle = None
        now = time.monotonic()              # paho's clock (the loop's, for asyncio's own loops)
        # a slot is taken in the last run before its moment (the runs drift a little, and a check
        # up to one interval early only finds nothing due and places the connection again)
        for slot in [s for s in self._slots if (s - 1) * self.INTERVAL <= now]:
            for ref in self._slots.pop(slot):
                transport = ref()
                if transport is None or self._due.get(transport) != slot or transport not in self._members:
                    continue
                del self._due[transport]
                try:
                    due = transport._tick()  # noqa: SLF001 - the ticker is part of the transport
                except Exception:
                    log.exception("keepalive tick for %s failed", transport.client_id)
                    due = now + self.INTERVAL
                self._place(transport, max(due, now + self.INTERVAL))
        if len(self._members) and not self._loop.is_closed():
            self._handle = self._loop.call_later(self.INTERVAL, self._run)


# ---------------------------------------------------------------- broker failover (URL list)


def split_broker_urls(target: str | Sequence[str]) -> list[str]:
    """``"mqtt://a:1883,mqtt://b:1883"`` or a sequence of URLs -> the list of URLs (blanks dropped)."""
    items = target.split(",") if isinstance(target, str) else list(target)
    if not all(isinstance(u, str) for u in items):
        raise TypeError("broker URLs must be str")
    urls = [u.strip() for u in items if u.strip()]
    if not urls:
        raise ValueError("no broker URL given")
    return urls


class BrokerRotation:
    """The broker endpoints of one transport and which one is in use; ``advance()`` moves on."""

    __slots__ = ("endpoints", "index", "switches")

    def __init__(self, urls: Sequence[str]) -> None:
        endpoints: list[tuple[str, int, TLSConfig | None]] = []
        for url in urls:
            cfg = TransportConfig.from_url(url)
            endpoints.append((cfg.host, cfg.port, cfg.tls))
        if len({tls is None for _, _, tls in endpoints}) > 1:
            raise ValueError("broker URLs mix mqtt:// and mqtts:// (one scheme for every node)")
        self.endpoints = endpoints
        self.index = 0
        self.switches = 0  # how many times the transport moved to another broker

    def __len__(self) -> int:
        return len(self.endpoints)

    @property
    def urls(self) -> list[str]:
        return [f"{'mqtts' if tls else 'mqtt'}://{host}:{port}" for host, port, tls in self.endpoints]

    def advance(self, config: TransportConfig) -> TransportConfig:
        """``config`` pointed at the next endpoint (round-robin)."""
        self.index = (self.index + 1) % len(self.endpoints)
        self.switches += 1
        host, port, tls = self.endpoints[self.index]
        return replace(config, host=host, port=port, tls=tls if tls is None else config.tls)


# ---------------------------------------------------------------- end of broker failover


_TICKERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Ticker] = weakref.WeakKeyDictionary()


def _ticker(loop: asyncio.AbstractEventLoop) -> _Ticker:
    ticker = _TICKERS.get(loop)
    if ticker is None:
        ticker = _TICKERS[loop] = _Ticker(loop)
    return ticker


@dataclass(frozen=True)
class TLSConfig:
    """TLS settings: CA bundle (None = system CAs), optional client certificate."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    check_hostname: bool = True


@dataclass(frozen=True)
class Will:
    """Last-will message the broker publishes if the connection dies uncleanly."""

    topic: str
    payload: bytes = b""
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class TransportConfig:
    """Everything needed to reach one broker. Build it directly or with :meth:`from_url`."""

    host: str = "127.0.0.1"
    port: int = 1883
    tls: TLSConfig | None = None
    username: str | None = None
    password: Password = None
    client_id: str | None = None
    protocol: Protocol = "auto"
    keepalive: int = 30
    persistent: bool = False
    session_expiry: int = 3600
    will: Will | None = None
    reconnect: bool = True
    backoff_min: float = 0.05  # reconnect backoff base (seconds)
    backoff_max: float = 10.0  # reconnect backoff cap (seconds)
    backoff_jitter: Jitter = "full"
    connect_timeout: float = 10.0
    probe_timeout: float = 1.0
    publish_timeout: float | None = 60.0
    max_pending: int = 10_000
    queue_wait: float = 0.0  # seconds a publish waits for room under max_pending (0: raise at once)
    max_inflight: int = 0  # 0: as many as the broker's MQTT 5 Receive Maximum allows (no cap on 3.1.1)
    incoming_limit: int = 10_000

    def __post_init__(self) -> None:
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise ValueError(f"protocol must be 'auto', '5' or '3.1.1', not {self.protocol!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"bad port {self.port}")
        if self.max_pending < 1 or self.max_inflight < 0 or self.incoming_limit < 1:
            raise ValueError("max_pending and incoming_limit must be positive, max_inflight >= 0")
        if not 0 < self.backoff_min <= self.backoff_max:
            raise ValueError("reconnect backoff needs 0 < backoff_min <= backoff_max")
        if self.backoff_jitter not in ("full", "decorrelated", "none"):
            raise ValueError(f"backoff_jitter must be 'full', 'decorrelated' or 'none', not {self.backoff_jitter!r}")
        if not self.connect_timeout > 0 or not self.queue_wait >= 0:
            raise ValueError("connect_timeout must be positive and queue_wait >= 0")

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> TransportConfig:
        """Parse ``mqtt://`` / ``mqtts://`` URLs (see the module docstring); kwargs win."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"unsupported broker URL scheme {parts.scheme!r} (use mqtt:// or mqtts://)")
        secure = parts.scheme in ("mqtts", "ssl")
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        kw: dict[str, Any] = {
            "host": parts.hostname or "127.0.0.1",
            "port": parts.port or (8883 if secure else 1883),
        }
        if parts.username:
            kw["username"] = unquote(parts.username)
        if parts.password:
            kw["password"] = unquote(parts.password)
        if "protocol" in q:
            kw["protocol"] = {"5": "5", "5.0": "5", "3.1.1": "3.1.1", "4": "3.1.1", "auto": "auto"}.get(
                q["protocol"], q["protocol"]
            )
        if "client_id" in q:
            kw["client_id"] = q["client_id"]
        if "keepalive" in q:
            kw["keepalive"] = int(q["keepalive"])
        if "persistent" in q:
            kw["persistent"] = q["persistent"].lower() in ("1", "true", "yes")
        if secure:
            kw["tls"] = TLSConfig(
                ca_file=q.get("ca"),
                cert_file=q.get("cert"),
                key_file=q.get("key"),
                check_hostname=q.get("insecure", "0").lower() not in ("1", "true", "yes"),
            )
        kw.update(overrides)
        return cls(**kw)

    @property
    def url(self) -> str:
        """The broker URL without credentials."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Message:
    """One received application message."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass
class _Sub:
    qos: int
    handler: MessageCallback | None = None


class _SubscribeBatch:
    """Subscriptions asked for in one loop turn: they leave as one SUBSCRIBE, and its SUBACK's
    reason codes go back to each caller by filter."""

    __slots__ = ("filters", "future", "mid", "sent", "waiting")

    def __init__(self, future: asyncio.Future[list[int]]) -> None:
        self.filters: dict[str, int] = {}   # filter -> QoS, in packet order
        self.future = future                # the SUBACK's reason codes
        self.mid: int | None = None
        self.sent = False
        self.waiting = 0


#: most filters in one SUBSCRIBE (more asked in one loop turn go in the next packet)
_SUBSCRIBE_BATCH = 64


def _reason_value(rc: Any) -> int:
    return int(rc.value) if isinstance(rc, ReasonCode) else int(rc)


def _deliver(cb: MessageCallback, msg: Message, tasks: set[asyncio.Task[Any]]) -> None:
    try:
        res = cb(msg.topic, msg.payload, retain=msg.retain, qos=msg.qos)
    except Exception:
        log.exception("message handler for %s raised", msg.topic)
        return
    if inspect.isawaitable(res):
        task = asyncio.ensure_future(res)
        tasks.add(task)
        task.add_done_callback(_handler_done(tasks))


def _handler_done(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("async message handler raised", exc_info=task.exception())

    return done


async def _open_tcp(loop: asyncio.AbstractEventLoop, host: str, port: int, timeout: float) -> socket.socket:
    """A connected non-blocking TCP socket to ``host:port``, opened on ``loop`` (each address
    in turn, as ``socket.create_connection`` does; a name is resolved off the loop, an address
    literal is not looked up)."""
    try:
        ip = ipaddress.ip_address(host)
        family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
        infos: list[tuple[Any, ...]] = [(family, socket.SOCK_STREAM, 0, "", (host, port))]
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    error: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                await loop.sock_connect(sock, addr)
            return sock
        except TimeoutError:
            sock.close()
            error = TimeoutError(f"timed out after {timeout:g} s")
        except OSError as exc:
            sock.close()
            error = exc
        except BaseException:
            sock.close()
            raise
    raise error or OSError(f"no address for {host}")


class MqttTransport:
    """One MQTT connection driven by the running asyncio loop (see the module docstring)."""

    def __init__(
        self,
        target: str | Sequence[str] | TransportConfig,
        /,
        *,
        on_message: MessageCallback | None = None,
        **overrides: Any,
    ) -> None:
        # broker failover: several URLs (a list or "url1,url2") share the first URL's options
        urls = [] if isinstance(target, TransportConfig) else split_broker_urls(target)
        self._rotation: BrokerRotation | None = BrokerRotation(urls) if len(urls) > 1 else None
        if urls:
            target = urls[0]
        if isinstance(target, str):
            cfg = TransportConfig.from_url(target, **overrides)
        elif isinstance(target, TransportConfig):
            cfg = replace(target, **overrides) if overrides else target
        else:
            raise TypeError("target must be a broker URL, a list of them or a TransportConfig")
        if cfg.client_id is None:
            cfg = replace(cfg, client_id="autoglm-" + secrets.token_hex(8))
        self.config: TransportConfig = cfg
        self.on_message: MessageCallback | None = on_message
        self._protocol: Literal["5", "3.1.1"] = (
            cfg.protocol if cfg.protocol != "auto" else _NEGOTIATED.get((cfg.host, cfg.port), "5")
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._sock: Any = None
        self._connected = asyncio.Event()
        self._connack: asyncio.Future[tuple[int, bool]] | None = None
        self._closing = False
        self._running = False
        self._reconnect_task: asyncio.Task[None] | None = None
        self._pub_futs: dict[int, asyncio.Future[None]] = {}
        # (deadline, future, topic, timeout) per QoS 1/2 publish awaiting its ack, in deadline order
        self._ack_deadlines: collections.deque[tuple[float, asyncio.Future[None], str, float]] = \
            collections.deque()
        self._ack_timer: asyncio.TimerHandle | None = None
        self._room_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._qos0_pending = 0
        self._sub_futs: dict[int, asyncio.Future[list[int]]] = {}
        self._sub_batch: _SubscribeBatch | None = None
        self._subs: dict[str, _Sub] = {}
        self._hooks: list[ConnectHook] = []
        self._queue: collections.deque[Message] = collections.deque()
        self._queue_wakeup: asyncio.Event | None = None
        self._read_paused = False
        self._handler_tasks: set[asyncio.Task[Any]] = set()
        self._deferred: list[Callable[[], None]] | None = None
        self._close_waiter: asyncio.Future[None] | None = None
        self._flush_scheduled = False
        self._wrote_this_turn = False  # a packet was written at once in this loop turn
        self._writer_sock: Any = None  # the socket add_writer() watches (EAGAIN), if any
        self._reading = False  # inside _on_readable: acks wait until the handlers' wake-ups ran
        self._quiet = True  # the last read drained the socket
        self._received = 0  # PUBLISH packets received
        self._loop_thread: int | None = None
        self.reconnects = 0
        #: the backoff delays slept before reconnect attempts (the last 64)
        self.reconnect_delays: collections.deque[float] = collections.deque(maxlen=64)
        self.session_present = False

    # ------------------------------------------------------------------ public API

    @property
    def client_id(self) -> str:
        return self.config.client_id or ""

    @property
    def broker_url(self) -> str:
        """The URL of the broker in use (or tried next while reconnecting), without credentials."""
        return self.config.url

    @property
    def broker_urls(self) -> list[str]:
        """Every broker this transport may use, in rotation order."""
        return self._rotation.urls if self._rotation is not None else [self.config.url]

    @property
    def broker_switches(self) -> int:
        """How many times the transport moved to another broker of its list."""
        return self._rotation.switches if self._rotation is not None else 0

    def _next_broker(self) -> bool:
        """Point the config at the next broker of the list; False with a single broker."""
        if self._rotation is None:
            return False
        cfg = self.config
        if cfg.protocol == "auto" and self._broker_key() in _NEGOTIATED:
            cfg = replace(cfg, protocol=self._protocol)  # the nodes of one cluster speak alike
        self.config = self._rotation.advance(cfg)
        return True

    async def _connect_first(self) -> bool:
        """The first CONNECT: each broker of the list once (an unreachable one is skipped)."""
        tries = len(self._rotation) if self._rotation is not None else 1
        for attempt in range(tries):
            try:
                return await self._connect_once(first=True)
            except ConnectFailed as exc:
                if attempt + 1 >= tries or exc.reason in ("bad_credentials", "not_authorized"):
                    raise
                log.warning("broker %s unreachable (%s); trying the next", self.config.url, exc.reason)
                self._teardown_client()
                self._next_broker()
        raise AssertionError("unreachable")

    @property
    def protocol(self) -> Literal["5", "3.1.1"]:
        """The MQTT version in use (after connect: what the broker accepted)."""
        return self._protocol

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def pending(self) -> int:
        """Publishes handed to paho and not yet acknowledged (QoS 1/2) or written (QoS 0)."""
        return len(self._pub_futs) + self._qos0_pending

    async def __aenter__(self) -> MqttTransport:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Connect (first attempt: no retries, errors raise :class:`ConnectFailed`)."""
        if self._running:
            raise RuntimeError("transport is already connected (not re-entrant)")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._closing = False
        self._running = True
        self._queue_wakeup = asyncio.Event()
        try:
            session_present = await self._connect_first()
        except BaseException:
            self._running = False
            self._teardown_client()
            raise
        _ticker(self._loop).add(self)
        await self._after_connect(session_present)

    async def aclose(self) -> None:
        """Disconnect cleanly (DISCONNECT sent, so no will) and fail what is still pending."""
        if not self._running:
            return
        self._closing = True
        if self._loop is not None:
            _ticker(self._loop).discard(self)
        task = self._reconnect_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._reconnect_task = None
        client = self._client
        if client is not None and self._connected.is_set():
            closed = self._loop.create_future() if self._loop else None
            self._close_waiter = closed
            client.disconnect()
            if closed is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(closed, 2.0)
        self._teardown_client()
        self._fail_all(NotConnected("transport closed"))
        for task in list(self._handler_tasks):
            task.cancel()
        self._running = False
        if self._queue_wakeup is not None:
            self._queue_wakeup.set()

    async def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        *,
        qos: int = 0,
        retain: bool = False,
        timeout: float | None = None,
        properties: Properties | None = None,
    ) -> None:
        """Publish; for QoS 1/2 wait for the broker's acknowledgement."""
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        client = self._client
        if client is None or not self._running:
            raise NotConnected("transport is not connected")
        if self.pending >= self.config.max_pending:
            await self._wait_for_room(topic)
            client = self._client
            if client is None or not self._running:
                raise NotConnected("transport is not connected")
        if qos == 0 and not self._connected.is_set():
            raise NotConnected("not connected (QoS 0 messages are not queued offline)")
        if isinstance(payload, str):
            payload = payload.encode("utf-8")
        if self._sub_batch is not None:
            self._send_subscriptions_first()
        if qos == 0:
            # counted before paho sees it: an idle connection writes it (and calls on_publish) at once
            self._qos0_pending += 1
        try:
            info = client.publish(topic, payload, qos, retain, properties)
        except BaseException:
            if qos == 0:
                self._qos0_pending = max(0, self._qos0_pending - 1)
            raise
        rc = info.rc
        if qos == 0:
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not info.is_published():
                self._qos0_pending = max(0, self._qos0_pending - 1)
            if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                raise NotConnected("not connected")
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise PublishFailed(f"publish failed: {paho.error_string(rc)}")
            return
        if rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise SendQueueFull("paho refused the message: queue full")
        if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise PublishFailed(f"publish failed: {paho.error_string(rc)}")
        # paho never writes synchronously here (a register-write callback is set), so the
        # acknowledgement cannot have arrived yet.
        loop = self._loop
        assert loop is not None
        fut: asyncio.Future[None] = loop.create_future()
        self._pub_futs[info.mid] = fut
        wait = timeout if timeout is not None else self.config.publish_timeout
        if wait is None:
            await fut
            return
        deadline = loop.time() + wait
        acks = self._ack_deadlines
        if not acks or acks[-1][0] <= deadline:
            # the usual case, one timeout for every publish: deadlines in publish order, so one
            # FIFO and one timer for its head serve them all (no timer per publish)
            acks.append((deadline, fut, topic, wait))
            if self._ack_timer is None:
                self._ack_timer = loop.call_at(deadline, self._expire_acks)
            await fut
            return
        try:
            async with asyncio.timeout(wait):
                await fut
        except TimeoutError:
            # the (cancelled) future stays in _pub_futs until paho reports the ack: the message
            # is still queued in the session and still counts against max_pending
            raise PublishTimeout(f"no acknowledgement for {topic!r} within {wait}s") from None

    def _expire_acks(self) -> None:
        """Fail the publishes whose acknowledgement is overdue (each still waits in the session
        and still counts against max_pending, as its future stays in ``_pub_futs`` until paho
        reports the ack); re-arm for the next deadline."""
        self._ack_timer = None
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        acks, now = self._ack_deadlines, loop.time()
        while acks and (acks[0][1].done() or acks[0][0] <= now):
            _, fut, topic, wait = acks.popleft()
            if not fut.done():
                fut.set_exception(PublishTimeout(f"no acknowledgement for {topic!r} within {wait}s"))
        if acks:
            self._ack_timer = loop.call_at(acks[0][0], self._expire_acks)

    def _drop_acked(self) -> None:
        """Forget the acknowledged publishes at the head of the deadline FIFO (acks arrive mostly
        in publish order, so it stays as long as the publishes in flight, not as the timeout)."""
        acks = self._ack_deadlines
        while acks and acks[0][1].done():
            acks.popleft()

    async def _wait_for_room(self, topic: str) -> None:
        """Wait (FIFO) until fewer than ``max_pending`` publishes are outstanding, or raise."""
        cfg = self.config
        assert self._loop is not None
        deadline = self._loop.time() + cfg.queue_wait
        while self.pending >= cfg.max_pending:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                log.warning("send queue full (%d pending) publishing to %s", self.pending, topic)
                raise SendQueueFull(f"{self.pending} publishes await acknowledgement (max_pending)")
            fut: asyncio.Future[None] = self._loop.create_future()
            self._room_waiters.append(fut)
            try:
                async with asyncio.timeout(remaining):
                    await fut
            except TimeoutError:
                pass
            finally:
                if not fut.done():
                    fut.cancel()

    def _release_room(self) -> None:
        """Wake as many waiting publishes as there is room for."""
        room = self.config.max_pending - self.pending
        waiters = self._room_waiters
        while room > 0 and waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                room -= 1

    async def subscribe(
        self,
        topic_filter: str,
        *,
        qos: int = 1,
        handler: MessageCallback | None = None,
        timeout: float | None = None,
    ) -> int:
        """Subscribe and wait for the SUBACK; return the granted QoS.

        Subscriptions asked for in the same event-loop turn (say, under one ``asyncio.gather``)
        leave as one SUBSCRIBE packet, before anything published or unsubscribed after them.
        While a reconnect is under way this waits for it (up to ``timeout`` or
        ``connect_timeout``) instead of failing at once.
        """
        if qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")
        if self._running and not self._connected.is_set():
            with contextlib.suppress(ConnectFailed):
                await self.wait_connected(timeout or self.config.connect_timeout)
        if not self._connected.is_set() or self._client is None:
            raise NotConnected("not connected")
        self._subs[topic_filter] = _Sub(qos, handler)
        try:
            code = await self._subscribe_batched(topic_filter, qos, timeout)
        except BaseException:
            self._subs.pop(topic_filter, None)
            raise
        if code >= 0x80:
            self._subs.pop(topic_filter, None)
            log.warning("broker refused subscription %s (code 0x%02x)", topic_filter, code)
            raise SubscribeFailed(f"broker refused subscription to {topic_filter!r} (0x{code:02x})")
        return code

    async def _subscribe_batched(self, topic_filter: str, qos: int, timeout: float | None) -> int:
        assert self._loop is not None
        batch = self._sub_batch
        if batch is None or topic_filter in batch.filters or len(batch.filters) >= _SUBSCRIBE_BATCH:
            if batch is not None:           # the same filter twice, or a full packet: send it now
                self._send_subscribe_batch(batch)
            batch = self._sub_batch = _SubscribeBatch(self._loop.create_future())
            self._loop.call_soon(self._send_subscribe_batch, batch)
        batch.filters[topic_filter] = qos
        batch.waiting += 1
        try:
            codes = await asyncio.wait_for(asyncio.shield(batch.future), timeout or self.config.connect_timeout)
        except TimeoutError:
            raise SubscribeFailed("no SUBACK in time", reason="timeout") from None
        finally:
            batch.waiting -= 1
            if not batch.waiting and batch.mid is not None and not batch.future.done():
                self._sub_futs.pop(batch.mid, None)     # nobody waits for this SUBACK any more
        by_filter = dict(zip(batch.filters, codes, strict=False))
        if topic_filter not in by_filter:
            raise SubscribeFailed(f"the SUBACK has no reason code for {topic_filter!r}")
        return by_filter[topic_filter]

    def _send_subscribe_batch(self, batch: _SubscribeBatch) -> None:
        """Send ``batch`` (once: a no-op when already sent)."""
        if self._sub_batch is batch:
            self._sub_batch = None
        if batch.sent:
            return
        batch.sent = True
        try:
            if not self._connected.is_set() or self._client is None:
                raise NotConnected("not connected")
            batch.mid = self._queue_subscribe(list(batch.filters.items()), batch.future)
        except NotConnected as exc:
            batch.future.set_exception(exc)
            batch.future.exception()

    def _send_subscriptions_first(self) -> None:
        """Keep the wire in call order: subscriptions asked for before go out before this."""
        if self._sub_batch is not None:
            self._send_subscribe_batch(self._sub_batch)

    async def unsubscribe(self, topic_filter: str, *, timeout: float | None = None) -> None:
        """Forget the subscription (and its handler); tell the broker if connected."""
        self._send_subscriptions_first()
        self._subs.pop(topic_filter, None)
        if self._connected.is_set() and self._client is not None:
            rc, mid = self._client.unsubscribe(topic_filter)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                fut = self._loop.create_future()  # type: ignore[union-attr]
                self._sub_futs[mid] = fut
                with contextlib.suppress(asyncio.TimeoutError, TransportError):
                    await asyncio.wait_for(fut, timeout or self.config.connect_timeout)

    def add_on_connect(self, hook: ConnectHook) -> Callable[[], None]:
        """Run ``hook(session_present)`` after every (re)connect; returns a remover."""
        self._hooks.append(hook)
        return lambda: self._hooks.remove(hook) if hook in self._hooks else None

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until the connection is (re-)established."""
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise ConnectFailed("not reconnected in time", reason="connect_timeout") from None

    async def messages(self) -> AsyncIterator[Message]:
        """Messages not taken by a subscription handler or ``on_message``."""
        while self._running or self._queue:
            if self._queue:
                msg = self._queue.popleft()
                if self._read_paused and len(self._queue) <= self.config.incoming_limit // 2:
                    self._resume_reading()
                yield msg
                continue
            assert self._queue_wakeup is not None
            self._queue_wakeup.clear()
            await self._queue_wakeup.wait()

    async def abort(self) -> None:
        """Drop the TCP connection without DISCONNECT, as a crash would: the broker publishes the will."""
        self._closing = True
        self._drop_socket()
        self._connected.clear()
        await self.aclose()

    # ------------------------------------------------------------------ connection

    def _make_client(self) -> paho.Client:
        cfg = self.config
        proto = paho.MQTTv5 if self._protocol == "5" else paho.MQTTv311
        kwargs: dict[str, Any] = {}
        if proto == paho.MQTTv311:
            kwargs["clean_session"] = not cfg.persistent
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id or "", protocol=proto, **kwargs)
        c.suppress_exceptions = True
        _paho.skip_empty_callback_lookup(c)        # routing is ours: no topic walk per message
        c.connect_timeout = cfg.connect_timeout
        c.max_inflight_messages_set(cfg.max_inflight)  # refined by the CONNACK's Receive Maximum
        c.max_queued_messages_set(0)
        if cfg.tls is not None:
            ctx = ssl.create_default_context(cafile=cfg.tls.ca_file)
            if cfg.tls.cert_file:
                ctx.load_cert_chain(cfg.tls.cert_file, cfg.tls.key_file)
            ctx.check_hostname = cfg.tls.check_hostname
            c.tls_set_context(ctx)
        if cfg.will is not None:
            w = cfg.will
            c.will_set(w.topic, w.payload, w.qos, w.retain)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_unsubscribe
        c.on_message = self._on_paho_message
        c.on_socket_open = self._on_socket_open
        c.on_socket_close = self._on_socket_close
        c.on_socket_register_write = self._on_socket_register_write
        c.on_socket_unregister_write = self._on_socket_unregister_write
        return c

    async def _connect_once(self, *, first: bool) -> bool:
        """One CONNECT attempt (plus the MQTT 5 → 3.1.1 fallback); returns session_present."""
        cfg = self.config
        assert self._loop is not None
        if self._client is None:
            self._client = self._make_client()
        client = self._client
        pw = cfg.password(self.client_id) if callable(cfg.password) else cfg.password
        if cfg.username is not None or pw is not None:
            client.username_pw_set(cfg.username, cast(Any, pw))  # paho takes bytes too
        kwargs: dict[str, Any] = {}
        if self._protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry if cfg.persistent else 0
            kwargs = {"clean_start": not cfg.persistent, "properties": props}
        self._connack = self._loop.create_future()
        self._deferred = []
        try:
            if _paho.opens_plain_socket(client):
                # plain TCP: the socket is opened on the loop and handed to paho, whose connect()
                # then only queues the CONNECT (no thread per connect); paho reads and writes
                # it through user-space buffers (a system call per read batch and per flush)
                sock = BufferedSocket(await _open_tcp(self._loop, cfg.host, cfg.port, cfg.connect_timeout))
                try:
                    _paho.connect_over(client, sock, lambda: client.connect(
                        cfg.host, cfg.port, cfg.keepalive, **kwargs))
                except BaseException:
                    if _paho.socket_of(client) is not sock:
                        sock.discard()
                        sock.close()
                    raise
            else:
                # connect() blocks (DNS, TCP, TLS handshake): run it off the loop; socket
                # callbacks it triggers are deferred and replayed on the loop below.
                await self._loop.run_in_executor(
                    None, lambda: client.connect(cfg.host, cfg.port, cfg.keepalive, **kwargs)
                )
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._deferred = None
            raise ConnectFailed(f"cannot reach broker {cfg.url}: {exc}") from exc
        finally:
            deferred, self._deferred = self._deferred or [], None
        for fn in deferred:
            fn()
        probing = cfg.protocol == "auto" and self._protocol == "5" and self._broker_key() not in _NEGOTIATED
        wait = min(cfg.connect_timeout, cfg.probe_timeout) if probing else cfg.connect_timeout
        try:
            code, session_present = await asyncio.wait_for(self._connack, wait)
        except TimeoutError:
            if probing:  # e.g. amqtt misparses an MQTT 5 CONNECT with credentials and never answers
                return await self._downgrade(first)
            self._drop_socket()
            raise ConnectFailed(f"no CONNACK from {cfg.url}", reason="connect_timeout") from None
        except ConnectionLost as exc:
            # only while probing: after that a fresh client would drop the queued session state
            if probing:
                return await self._downgrade(first)
            raise ConnectFailed(f"broker {cfg.url} closed the connection before CONNACK") from exc
        if code == _UNSUPPORTED_PROTOCOL and probing:
            return await self._downgrade(first)
        if code == 0:
            if cfg.protocol == "auto":
                _NEGOTIATED[self._broker_key()] = self._protocol
        else:
            self._drop_socket()
            reason = _AUTH_CODES.get(code, "unsupported_protocol" if code == _UNSUPPORTED_PROTOCOL
                                     else "connect_failed")
            log.warning("broker %s refused CONNECT: code 0x%02x (%s)", cfg.url, code, reason)
            raise ConnectFailed(f"broker {cfg.url} refused CONNECT (code 0x{code:02x})", reason=reason)
        return session_present

    def _broker_key(self) -> tuple[str, int]:
        return (self.config.host, self.config.port)

    async def _downgrade(self, first: bool) -> bool:
        log.info("broker %s does not speak MQTT 5; using 3.1.1", self.config.url)
        self._drop_socket()
        self._teardown_client()
        self._protocol = "3.1.1"  # cached in _NEGOTIATED only once a 3.1.1 CONNECT succeeds
        return await self._connect_once(first=True)

    async def _after_connect(self, session_present: bool) -> None:
        self.session_present = session_present
        self._connected.set()
        if self._subs and not (session_present and self.config.persistent):
            try:
                codes = await self._send_subscribe([(t, s.qos) for t, s in self._subs.items()], None)
                for (t, _), code in zip(list(self._subs.items()), codes, strict=False):
                    if code >= 0x80:
                        log.warning("resubscription to %s refused (0x%02x)", t, code)
            except TransportError as exc:
                log.warning("resubscription failed: %s", exc)
        for hook in list(self._hooks):
            try:
                res = hook(session_present)
                if inspect.isawaitable(res):
                    await res
            except Exception:
                log.exception("on_connect hook %r raised", hook)

    async def _reconnect_loop(self) -> None:
        cfg = self.config
        backoff = Backoff(cfg.backoff_min, cfg.backoff_max, cfg.backoff_jitter)
        if self._next_broker():  # failover: the node just lost is the last one to retry
            log.info("connection lost; failing over to %s", self.config.url)
        while not self._closing and not self._connected.is_set():
            try:
                session_present = await self._connect_once(first=False)
            except ConnectFailed as exc:
                delay = backoff.next()
                self.reconnect_delays.append(delay)
                failed = self.config.url
                self._next_broker()
                log.info("reconnect to %s failed (%s); retrying %s in %.2fs", failed, exc.reason,
                         self.config.url, delay)
                await asyncio.sleep(delay)
                continue
            self.reconnects += 1
            backoff.reset()
            log.info("reconnected to %s (session present: %s)", self.config.url, session_present)
            # if the link drops again during this, _on_disconnect sees this task still running:
            # the while condition then takes over
            await self._after_connect(session_present)

    def _tick(self) -> float:
        """Keepalive bookkeeping (called by the loop's shared ticker when it may be due): a ping
        when the link has been quiet for the keepalive, a drop when a ping went unanswered for as
        long. Returns when it may next be due (loop time); never more than the keepalive away."""
        client = self._client
        if client is None or self._sock is None:
            return time.monotonic() + _Ticker.INTERVAL   # (re)connecting: look again in a second
        client.loop_misc()
        return _paho.keepalive_due(client)

    def _queue_subscribe(self, subs: list[tuple[str, int]], fut: asyncio.Future[list[int]]) -> int:
        """Hand one SUBACK-awaiting SUBSCRIBE to paho; ``fut`` gets its reason codes. Returns the mid."""
        assert self._client is not None
        rc, mid = self._client.subscribe(subs)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise NotConnected(f"subscribe failed: {paho.error_string(rc)}")
        self._sub_futs[mid] = fut
        return mid

    async def _send_subscribe(self, subs: list[tuple[str, int]], timeout: float | None) -> list[int]:
        assert self._loop is not None
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        mid = self._queue_subscribe(subs, fut)
        try:
            return await asyncio.wait_for(fut, timeout or self.config.connect_timeout)
        except TimeoutError:
            self._sub_futs.pop(mid, None)
            raise SubscribeFailed("no SUBACK in time", reason="timeout") from None

    def _teardown_client(self) -> None:
        self._drop_socket()
        self._client = None
        self._connected.clear()

    def _drop_socket(self) -> None:
        """Close the socket without DISCONNECT (the broker sees an unclean drop)."""
        sock = self._sock
        if sock is None:
            return
        self._unwatch(sock)
        self._sock = None
        client = self._client
        if client is not None:
            _paho.forget_socket(client, sock)
        if isinstance(sock, BufferedSocket):
            sock.discard()                      # unclean: what was kept is not sent
        with contextlib.suppress(OSError):
            sock.close()

    def _fail_all(self, exc: TransportError) -> None:
        for futs in (self._pub_futs, self._sub_futs):
            for fut in futs.values():
                if not fut.done():
                    fut.set_exception(exc)
                    fut.exception()  # mark retrieved: nobody may be awaiting it
            futs.clear()
        self._ack_deadlines.clear()
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        self._qos0_pending = 0
        self._release_room()

    # ------------------------------------------------------------------ socket plumbing

    def _in_loop_or_defer(self, fn: Callable[[], None]) -> None:
        """Run socket bookkeeping on the loop: deferred during connect(), hopped over if a
        connect() cancelled mid-way finishes later in its executor thread."""
        if self._deferred is not None:
            self._deferred.append(fn)
        elif threading.get_ident() == self._loop_thread:
            fn()
        elif self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def watch() -> None:
            if client is not self._client:  # a stale connect (cancelled, superseded) finished late
                with contextlib.suppress(OSError):
                    sock.close()
                return
            self._sock = sock
            if not self._read_paused:
                self._loop.add_reader(sock, self._on_readable)  # type: ignore[union-attr]

        self._in_loop_or_defer(watch)

    def _on_socket_close(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        def unwatch() -> None:
            self._unwatch(sock)
            if self._sock is sock:
                self._sock = None

        self._in_loop_or_defer(unwatch)

    def _unwatch(self, sock: Any) -> None:
        if self._writer_sock is sock:
            self._writer_sock = None
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(sock)
        with contextlib.suppress(ValueError, OSError):
            loop.remove_writer(sock)

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # Batch: everything queued during this loop iteration is written by one loop_write() call
        # scheduled with call_soon; only a full socket buffer falls back to add_writer.
        def schedule() -> None:
            if self._flush_scheduled:
                return
            if (not self._wrote_this_turn and _paho.queued_packets(client) == 1 and not self._reading
                    and not _paho.in_callback(client)):
                # a lone packet on an idle connection: write it now (one loop turn less latency);
                # never from inside a paho callback, where paho's own bookkeeping is mid-way, nor
                # while reading: the acks of what was read go after the tasks the messages woke.
                # Only the first one of a loop turn: the packets other tasks queue later in the
                # same turn (a fan-out) leave together in the one flush below, not one write each.
                self._wrote_this_turn = True
                self._loop.call_soon(self._new_turn)  # type: ignore[union-attr]
                self._flush(sock)
                return
            self._flush_scheduled = True
            self._loop.call_soon(self._flush, sock)  # type: ignore[union-attr]

        self._in_loop_or_defer(schedule)

    def _new_turn(self) -> None:
        self._wrote_this_turn = False

    def _flush(self, sock: Any) -> None:
        self._flush_scheduled = False
        client = self._client
        if client is None or _paho.socket_of(client) is not sock:
            return
        if isinstance(sock, BufferedSocket):
            self._write_buffered(client, sock)
            return
        sock = cast(socket.socket, sock)
        if _paho.queued_packets(client) > 1 and _CORK is not None:
            # several packets: cork so they leave as full segments, not one loopback trip each
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _CORK, 1)
            try:
                client.loop_write()
            finally:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, _CORK, 0)
        else:
            client.loop_write()
        if client.want_write() and _paho.socket_of(client) is sock:  # EAGAIN: wait until writable
            self._writer_sock = sock
            self._loop.add_writer(sock, self._on_writable)  # type: ignore[union-attr]

    def _write_buffered(self, client: paho.Client, sock: BufferedSocket) -> None:
        """What an earlier flush left, then paho's queue into ``sock``'s buffer and that to the
        kernel in one ``send``; a full kernel buffer: wait until writable (paho keeps queueing
        meanwhile). Also the writable callback of a buffered socket."""
        try:
            done = sock.flush()                         # nothing left: no system call
            if done:
                client.loop_write()
                if _paho.socket_of(client) is not sock:     # paho closed it (a DISCONNECT written)
                    return
                done = sock.flush()
        except OSError as exc:
            self._write_failed(client, sock, exc)
            return
        if not done:
            if self._writer_sock is not sock:
                self._writer_sock = sock
                self._loop.add_writer(sock, self._on_writable)  # type: ignore[union-attr]
        elif self._writer_sock is sock and not client.want_write():
            self._writer_sock = None
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(sock)  # type: ignore[union-attr]

    def _write_failed(self, client: paho.Client, sock: BufferedSocket, exc: OSError) -> None:
        """The connection is gone (reset, broken pipe): paho closes it and calls on_disconnect,
        as it does when its own send fails, and the transport reconnects."""
        log.info("write to the broker failed: %s", exc)
        sock.discard()
        if _paho.socket_of(client) is sock:
            _paho.handle_read_error(client, MQTTErrorCode.MQTT_ERR_CONN_LOST)

    def _on_socket_unregister_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        # paho calls this after every write that emptied its queue; only an EAGAIN added a writer
        # (a buffered socket's writer is left to _write_buffered, which knows what is still kept)
        if self._writer_sock is None or isinstance(sock, BufferedSocket):
            return

        def unreg() -> None:
            if self._writer_sock is not sock:
                return
            self._writer_sock = None
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(sock)  # type: ignore[union-attr]

        self._in_loop_or_defer(unreg)

    def _on_readable(self) -> None:
        # paho's loop_read() handles one packet per call here; read until the socket is drained
        # (bounded) so the acks for a burst leave in one corked write.
        client = self._client
        if client is None:
            return
        packet_read = _paho.packet_reader(client)
        if packet_read is None:  # pragma: no cover - another paho
            client.loop_read()
            return
        # Latency: the first message after a quiet spell is handed over alone (the tasks it woke
        # run before anything behind it is parsed and verified); a busy socket is read in batches.
        quiet = self._quiet
        self._quiet = False
        self._reading = True
        try:
            for _ in range(_READ_BATCH):
                if _paho.socket_of(client) is None or self._read_paused:
                    return
                seen = self._received
                rc = packet_read()
                if rc > 0:
                    _paho.handle_read_error(client, rc)  # closes the socket, calls on_disconnect
                    return
                if rc == MQTTErrorCode.MQTT_ERR_AGAIN:
                    self._quiet = True
                    return
                if quiet and self._received != seen:
                    assert self._loop is not None
                    self._loop.call_soon(self._on_readable)  # read on after them
                    return
            sock = _paho.socket_of(client)
            if isinstance(sock, BufferedSocket) and sock.buffered:
                assert self._loop is not None           # what was read ahead raises no epoll event
                self._loop.call_soon(self._on_readable)
        finally:
            self._reading = False

    def _on_writable(self) -> None:
        client = self._client
        if client is None:
            return
        sock = _paho.socket_of(client)
        if isinstance(sock, BufferedSocket):
            self._write_buffered(client, sock)
        else:
            client.loop_write()

    def _pause_reading(self) -> None:
        if not self._read_paused and self._sock is not None:
            self._read_paused = True
            log.warning("incoming queue full (%d); pausing reads", len(self._queue))
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self._sock)  # type: ignore[union-attr]

    def _resume_reading(self) -> None:
        self._read_paused = False
        if self._sock is not None:
            self._loop.add_reader(self._sock, self._on_readable)  # type: ignore[union-attr]
            if isinstance(self._sock, BufferedSocket) and self._sock.buffered:
                self._loop.call_soon(self._on_readable)  # type: ignore[union-attr]

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        # paho ignores the broker's Receive Maximum; exceeding it gets a client disconnected.
        # paho's in-flight bookkeeping is O(limit) per ack, so "unlimited" is 0, never 65535.
        receive_max = getattr(props, "ReceiveMaximum", 65535) if props is not None else 65535
        limits = [n for n in (self.config.max_inflight, receive_max if receive_max < 65535 else 0) if n > 0]
        _paho.set_max_inflight(client, min(limits) if limits else 0)
        fut = self._connack
        if fut is not None and not fut.done():
            fut.set_result((_reason_value(rc), bool(flags.session_present)))

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        waiter = self._close_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        fut = self._connack
        if fut is not None and not fut.done():
            fut.set_exception(ConnectionLost(f"connection closed before CONNACK ({rc})"))
            fut.exception()
        for sfut in list(self._sub_futs.values()):
            if not sfut.done():
                sfut.set_exception(ConnectionLost("connection lost while waiting for SUBACK"))
                sfut.exception()
        self._sub_futs.clear()
        self._qos0_pending = 0
        if client is not self._client or self._closing or not was_connected:
            return
        log.warning("connection to %s lost (%s)", self.config.url, rc)
        if self.config.reconnect and (self._reconnect_task is None or self._reconnect_task.done()):
            self._reconnect_task = self._loop.create_task(self._reconnect_loop())  # type: ignore[union-attr]

    def _on_publish(self, client: paho.Client, userdata: Any, mid: int, rc: Any, props: Any) -> None:
        fut = self._pub_futs.pop(mid, None)
        if self._room_waiters:
            self._loop.call_soon(self._release_room)  # type: ignore[union-attr]
        if fut is None:
            if self._qos0_pending > 0:
                self._qos0_pending -= 1
            return
        if not fut.done():
            code = _reason_value(rc)
            if code >= 0x80:
                reason = "not_authorized" if code == 0x87 else "publish_failed"
                fut.set_exception(PublishFailed(f"broker refused publish (0x{code:02x})", reason=reason))
            else:
                fut.set_result(None)
        acks = self._ack_deadlines
        if acks and acks[0][1] is fut:
            self._drop_acked()

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        fut = self._sub_futs.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result([_reason_value(c) for c in codes])

    def _on_unsubscribe(self, client: paho.Client, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        fut = self._sub_futs.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result([])

    def _on_paho_message(self, client: paho.Client, userdata: Any, m: paho.MQTTMessage) -> None:
        self._received += 1
        msg = Message(m.topic, bytes(m.payload), m.qos, bool(m.retain))
        for topic_filter, sub in self._subs.items():
            if sub.handler is not None and topic_matches(topic_filter, msg.topic):
                _deliver(sub.handler, msg, self._handler_tasks)
                return
        if self.on_message is not None:
            _deliver(self.on_message, msg, self._handler_tasks)
            return
        self._queue.append(msg)
        if self._queue_wakeup is not None:
            self._queue_wakeup.set()
        if len(self._queue) >= self.config.incoming_limit:
            self._pause_reading()


__all__ = [
    "Backoff",
    "Jitter",
    "backoff_delay",
    "MqttTransport",
    "TransportConfig",
    "TLSConfig",
    "Will",
    "Message",
    "Protocol",
    "MessageCallback",
    "ConnectHook",
    "BrokerRotation",
    "split_broker_urls",
]
