"""``SecureClient``: signed (optionally encrypted) pub/sub, request/response and streaming.

Policy lives here; the broker connection is :class:`sdk.messaging.transport.MqttTransport` and the
wire format is :mod:`sdk.messaging.envelope`. Every inbound message is verified before any handler
sees it; a rejection is counted in :attr:`SecureClient.stats`, logged, and never raised into
the connection. Message types used by the request protocol: ``response``, ``error``,
``stream.chunk``, ``stream.end``, ``cancel`` (see docs/PROTOCOL.md).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sdk.identity import Key, PublicKey
from sdk.messaging import topics
from sdk.messaging.authz import Authorizer, CredentialRequirement
from sdk.messaging.broker_auth import did_credentials
from sdk.messaging.envelope import (
    HEADER_CACHE_SIZE,
    MAX_ID_LEN,
    Message,
    Signer,
    Verifier,
    VerifyPolicy,
    new_id,
)
from sdk.messaging.errors import (
    Malformed,
    MessagingError,
    MissingExpiry,
    NotAuthorized,
    NotEncrypted,
    RejectedMessage,
    RemoteError,
    RequestTimeout,
    WrongSender,
)
from sdk.messaging.policy import Gate, InboundPolicy, Retained, Senders, StateOrder
from sdk.messaging.replay import ReplayCache
from sdk.messaging.transport import MqttTransport, TransportConfig

logger = logging.getLogger(__name__)

RESPONSE = "response"
ERROR = "error"
CHUNK = "stream.chunk"
END = "stream.end"
CANCEL = "cancel"
_REPLY_TYPES = frozenset({RESPONSE, ERROR, CHUNK, END})

Handler = Callable[[Message], Any]
RejectHook = Callable[[str, RejectedMessage], None]


@dataclass(frozen=True)
class ClientConfig:
    """Secure-client policy. Times are seconds."""

    policy: VerifyPolicy = VerifyPolicy()
    request_timeout: float = 30.0
    stream_idle_timeout: float = 60.0
    qos: int = 1
    replay_max_entries: int = 100_000
    reply_prefix: str = f"{topics.ROOT}/reply/"
    attach_credentials: bool = True  # attach the client's credentials to requests/streams
    max_serving: int = 1024  # concurrent requests served; beyond it requests get an error "busy"
    request_ttl: float = 60.0  # expiry of a stream request (or cancel) sent without an overall timeout
    max_state_keys: int = 100_000  # per Retained.STATE subscription: (sender, key) floors remembered
    header_cache: int = HEADER_CACHE_SIZE  # senders' envelope headers remembered (LRU of the hot senders)


@dataclass
class ClientStats:
    """Counters (monotonic, per client)."""

    published: int = 0
    received: int = 0
    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    handled: int = 0
    handler_errors: int = 0
    unmatched_replies: int = 0
    retained_dropped: int = 0  # retained deliveries ignored by Retained.DROP / serve()
    stale_state: int = 0  # Retained.STATE messages not newer than the last accepted
    unrouted: int = 0  # messages on no subscribed filter (dropped unverified)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


@dataclass(eq=False)
class Subscription:
    """A handler registered with :meth:`SecureClient.subscribe` / :meth:`SecureClient.serve`.

    For a ``Retained.STATE`` subscription, :attr:`versions` maps ``(sender DID, key)`` to the
    last accepted version; floors are per sender, so nobody can block another sender's state.
    """

    client: SecureClient
    filter: str
    handler: Handler
    policy: InboundPolicy
    versions: dict[tuple[str, Hashable], Any] = field(default_factory=dict)
    #: no broker subscription of its own: its messages come through a :meth:`SecureClient.cover`
    local: bool = False

    @property
    def require(self) -> CredentialRequirement | None:
        return self.policy.require

    @property
    def serve(self) -> bool:
        return self.policy.serve

    def advance(self, sender: str, key: Hashable, version: Any) -> None:
        """Raise the floor for ``(sender, key)`` (e.g. from a persistent store) to ``version``."""
        k = (sender.partition("#")[0], key)
        current = self.versions.get(k)
        if current is None or version > current:
            if current is None and len(self.versions) >= self.client.config.max_state_keys:
                self.versions.pop(next(iter(self.versions)))
            self.versions[k] = version

    async def cancel(self) -> None:
        """Unsubscribe."""
        await self.client._unsubscribe(self)  # noqa: SLF001 - the client owns its subscriptions


@dataclass(eq=False)
class _Pending:
    future: asyncio.Future[Message] | None = None
    queue: asyncio.Queue[Message | None] | None = None  # None: the client closed
    expect: str | None = None


class SecureClient:
    """Signed messaging over one broker connection for one DID key (``async with``).

    ``broker``: URL (``mqtt://host:port``), :class:`TransportConfig` or an
    :class:`MqttTransport`. ``credentials``: VCs about this client's DID attached to requests
    (for peers' :class:`CredentialRequirement`). ``did_auth``: log in with a DID proof (username =
    DID, password = fresh signed proof; needed by the embedded broker, ignored by an anonymous
    Mosquitto) unless a username/password is given. ``transport_options`` go to MqttTransport.
    """

    def __init__(
        self,
        broker: str | TransportConfig | MqttTransport,
        key: Key,
        *,
        config: ClientConfig = ClientConfig(),
        resolver: Any = None,
        credentials: list[Any] | tuple[Any, ...] = (),
        reply_topic: str | None = None,
        on_reject: RejectHook | None = None,
        did_auth: bool = True,
        **transport_options: Any,
    ) -> None:
        if not isinstance(key, Key):
            raise TypeError("key must be an sdk.identity.Key")
        if isinstance(broker, MqttTransport):
            if transport_options:
                raise TypeError("transport options cannot be combined with a transport instance")
            self.transport = broker
        else:
            has_login = isinstance(broker, TransportConfig) and (
                broker.username is not None or broker.password is not None)
            if did_auth and not has_login and "username" not in transport_options \
                    and "password" not in transport_options and "@" not in str(broker):
                transport_options.update(did_credentials(key))
            self.transport = MqttTransport(broker, **transport_options)
        # One match per message: the client takes every delivery (transport.on_message) and routes
        # it itself, unless the transport it was given already sends unmatched messages elsewhere.
        self._route: Any = None
        if self.transport.on_message is None:
            self.transport.on_message = self._on_raw
        else:
            self._route = self._on_raw
        self.key = key
        self.did = key.did
        self.config = config
        self.credentials = tuple(credentials)
        self.on_reject = on_reject
        self.stats = ClientStats()
        self.authorizer = Authorizer()
        self._signer = Signer(key, max_bytes=config.policy.max_bytes)
        window = config.policy.max_age + config.policy.clock_skew
        self._verifier = Verifier(
            key=key,
            resolver=resolver,
            policy=config.policy,
            replay=ReplayCache(window=window, max_entries=config.replay_max_entries),
            header_cache=config.header_cache,
        )
        self.reply_topic = topics.validate_topic(reply_topic or topics.reply_topic(topics.client_token(key.did)))
        self._subs: dict[str, list[Subscription]] = {}
        # filters subscribed at the broker: those of non-local subscriptions, and the covers
        self._subscribed: set[str] = set()
        self._covers: set[str] = set()
        # the wildcard filters of _subs, split once, in _subs order (rebuilt when a filter comes or goes)
        self._wild: list[tuple[list[str], list[Subscription]]] = []
        self._pending: dict[str, _Pending] = {}
        self._serving: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def verifier(self) -> Verifier:
        """The inbound envelope checker (its sender-header cache: :meth:`Verifier.resize_header_cache`)."""
        return self._verifier

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> SecureClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def connect(self) -> None:
        """Connect the transport and subscribe to this client's reply topic."""
        self._loop = asyncio.get_running_loop()
        if not self.transport.connected:
            await self.transport.connect()
        await self.transport.subscribe(self.reply_topic, qos=self.config.qos, handler=self._route)

    async def aclose(self) -> None:
        """Cancel served requests and pending calls, then disconnect."""
        tasks = list(self._serving.values()) + list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for p in self._pending.values():
            if p.future is not None and not p.future.done():
                p.future.set_exception(MessagingError("client closed", reason="closed"))
            elif p.queue is not None:
                p.queue.put_nowait(None)
        await self.transport.aclose()

    @property
    def connected(self) -> bool:
        return self.transport.connected

    # ------------------------------------------------------------------ publish / subscribe

    async def publish(
        self,
        topic: str,
        body: Any = None,
        *,
        type: str = "event",  # noqa: A002 - the protocol's field name
        qos: int | None = None,
        retain: bool = False,
        encrypt_to: str | PublicKey | None = None,
        ttl: float | None = None,
        reply_to: str | None = None,
        correlation_id: str | None = None,
        seq: int | None = None,
        credentials: list[Any] | tuple[Any, ...] | None = None,
        msg_id: str | None = None,
    ) -> str:
        """Sign (and optionally encrypt to ``encrypt_to``'s DID) and publish; return the id."""
        topics.validate_topic(topic)
        msg_id, wire = self._signer.seal(
            topic,
            body,
            type=type,
            msg_id=msg_id,
            ttl=ttl,
            reply_to=reply_to,
            correlation_id=correlation_id,
            seq=seq,
            encrypt_to=encrypt_to,
            credentials=credentials,
        )
        await self.transport.publish(topic, wire, qos=self.config.qos if qos is None else qos, retain=retain)
        self.stats.published += 1
        return msg_id

    async def subscribe(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        require: CredentialRequirement | None = None,
        senders: Senders | None = None,
        encrypted: bool = False,
        retained: Retained = Retained.MESSAGES,
        order: StateOrder | None = None,
        floors: Mapping[tuple[str, Hashable], Any] | None = None,
        gate: Gate | None = None,
        qos: int | None = None,
        local: bool = False,
    ) -> Subscription:
        """Call ``handler(message)`` (sync or async) for each verified message matching the filter.

        ``senders``: allowed sender DIDs (or a predicate); ``encrypted``: only E2E bodies;
        ``retained``: what a retained delivery means (:class:`Retained`; ``STATE`` needs
        ``order(message) -> (key, version)`` and then accepts only strictly newer versions per
        sender and key; ``floors`` maps ``(sender DID, key)`` to a version already held, set before
        the broker can deliver a retained copy); ``gate(message)`` may return a rejection before
        authorization runs;
        ``require``: a credential the sender must present. ``local=True``: no broker subscription
        of its own; the messages come through a broader filter subscribed with :meth:`cover`
        (register it before the cover, so that the cover's retained copies find it).
        """
        policy = InboundPolicy(require=require, senders=senders, encrypted=encrypted, retained=retained,
                               order=order, gate=gate)
        if floors and retained is not Retained.STATE:
            raise ValueError("floors= only applies to Retained.STATE")
        return await self._add_sub(topic_filter, handler, policy, qos=qos, floors=floors, local=local)

    async def cover(self, topic_filter: str, *, qos: int | None = None) -> None:
        """Subscribe at the broker to ``topic_filter`` with no handler of its own, for the
        ``local=True`` subscriptions under it: one broker subscription for several handlers, each
        with its own policy. What arrives through it and matches no subscription is dropped before
        it is verified. A broker keeps a list of subscribers per filter, so a filter every device
        shares costs each new subscriber a walk of that list: sharing one instead of two halves it.
        Idempotent; :meth:`uncover` ends it."""
        topics.validate_filter(topic_filter)
        if topic_filter in self._covers:
            return
        self._covers.add(topic_filter)
        if topic_filter in self._subscribed:
            return
        self._subscribed.add(topic_filter)
        try:
            await self.transport.subscribe(topic_filter, qos=self.config.qos if qos is None else qos,
                                           handler=self._route)
        except BaseException:
            self._covers.discard(topic_filter)
            self._subscribed.discard(topic_filter)
            raise

    async def uncover(self, topic_filter: str) -> None:
        """End the broker subscription :meth:`cover` made (kept while a non-local subscription
        has the same filter); the local subscriptions under it stay registered."""
        if topic_filter not in self._covers:
            return
        self._covers.discard(topic_filter)
        await self._release(topic_filter)

    async def _release(self, topic_filter: str) -> None:
        """Unsubscribe ``topic_filter`` at the broker once no cover and no non-local subscription
        needs it."""
        if topic_filter not in self._subscribed or topic_filter in self._covers:
            return
        if any(not sub.local for sub in self._subs.get(topic_filter, ())):
            return
        self._subscribed.discard(topic_filter)
        await self.transport.unsubscribe(topic_filter)

    async def serve(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        require: CredentialRequirement | None = None,
        senders: Senders | None = None,
        encrypted: bool = False,
        gate: Gate | None = None,
        qos: int | None = None,
    ) -> Subscription:
        """Answer requests: ``handler(message)`` returns a body, or an async iterator to stream.

        Requests must carry an expiry; retained deliveries never run. Options as :meth:`subscribe`.
        """
        policy = InboundPolicy(require=require, senders=senders, encrypted=encrypted, retained=Retained.DROP,
                               gate=gate, serve=True)
        return await self._add_sub(topic_filter, handler, policy, qos=qos)

    async def _add_sub(
        self, topic_filter: str, handler: Handler, policy: InboundPolicy, *, qos: int | None,
        floors: Mapping[tuple[str, Hashable], Any] | None = None, local: bool = False,
    ) -> Subscription:
        topics.validate_filter(topic_filter)
        if not callable(handler):
            raise TypeError("handler must be callable")
        sub = Subscription(self, topic_filter, handler, policy, local=local)
        for (sender, key), version in (floors or {}).items():
            sub.advance(sender, key, version)
        group = self._subs.setdefault(topic_filter, [])
        group.append(sub)
        if len(group) == 1:
            self._index_filters()
        if not local and topic_filter not in self._subscribed:
            self._subscribed.add(topic_filter)
            try:
                await self.transport.subscribe(
                    topic_filter, qos=self.config.qos if qos is None else qos, handler=self._route
                )
            except BaseException:
                self._subscribed.discard(topic_filter)
                group.remove(sub)
                if not group:
                    self._subs.pop(topic_filter, None)
                    self._index_filters()
                raise
        return sub

    def _index_filters(self) -> None:
        self._wild = [(f.split("/"), group) for f, group in self._subs.items() if topics.has_wildcard(f)]

    def _matching(self, topic: str) -> list[Subscription]:
        """The subscriptions whose filter matches ``topic``, in subscription order (as
        ``[sub for f, group in _subs.items() if topics.matches(f, topic) for sub in group]``): the
        exact filter by one lookup, the wildcard filters pre-split, the topic split once."""
        exact = self._subs.get(topic)
        if not self._wild:
            return list(exact) if exact else []
        t_levels = topic.split("/")
        wild = [group for f_levels, group in self._wild if topics.matches_levels(f_levels, t_levels)]
        if exact is None:
            return [sub for group in wild for sub in group]
        if not wild:
            return list(exact)
        # both kinds match (rare): subscription order across them
        return [sub for topic_filter, group in self._subs.items() if topics.matches(topic_filter, topic)
                for sub in group]

    async def _unsubscribe(self, sub: Subscription) -> None:
        subs = self._subs.get(sub.filter)
        if not subs or sub not in subs:
            return
        subs.remove(sub)
        if not subs:
            del self._subs[sub.filter]
            self._index_filters()
        await self._release(sub.filter)

    # ------------------------------------------------------------------ request / stream

    async def request(
        self,
        topic: str,
        body: Any = None,
        *,
        type: str = "request",  # noqa: A002
        timeout: float | None = None,
        encrypt_to: str | PublicKey | None = None,
        expect_from: str | None = None,
        qos: int | None = None,
        request_id: str | None = None,
    ) -> Message:
        """Send a request and return the verified response; raises RemoteError / RequestTimeout.

        Replies must come from ``expect_from`` (default: ``encrypt_to``'s DID when given).
        ``request_id`` is the request envelope's id (default: a fresh random one), for a body
        that must name the envelope carrying it; it must be unique to this sender (the
        receivers' replay caches refuse a repeated one).
        """
        timeout = self.config.request_timeout if timeout is None else timeout
        loop = self._loop or asyncio.get_running_loop()
        if request_id is not None and not (isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_LEN):
            raise ValueError(f"request_id must be a string of 1-{MAX_ID_LEN} characters")
        cid = new_id() if request_id is None else request_id
        if cid in self._pending:
            raise ValueError(f"request id {cid!r} is already in use")
        fut: asyncio.Future[Message] = loop.create_future()
        self._pending[cid] = _Pending(future=fut, expect=_expected(expect_from, encrypt_to))
        timer = loop.call_later(timeout, _expire, fut, topic, timeout)
        try:
            await self.publish(
                topic, body, type=type, qos=qos, encrypt_to=encrypt_to, ttl=timeout, reply_to=self.reply_topic,
                correlation_id=cid, msg_id=cid, credentials=self._creds(),
            )
            msg = await fut
        finally:
            timer.cancel()
            self._pending.pop(cid, None)
        if msg.type == RESPONSE:
            return msg
        if msg.type == ERROR:
            raise _remote_error(msg)
        with contextlib.suppress(MessagingError):
            await self.publish(topic, None, type=CANCEL, correlation_id=cid, ttl=self.config.request_ttl)
        raise MessagingError(f"peer answered {topic!r} with {msg.type!r}; use stream()", reason="protocol_error")

    def stream(
        self,
        topic: str,
        body: Any = None,
        *,
        type: str = "request",  # noqa: A002
        encrypt_to: str | PublicKey | None = None,
        expect_from: str | None = None,
        idle_timeout: float | None = None,
        first_timeout: float | None = None,
        timeout: float | None = None,
        qos: int | None = None,
    ) -> ResponseStream:
        """Send a request and iterate its response messages (``stream.chunk`` bodies, in order).

        Leaving early (break, exception, ``aclose()``) sends ``cancel``; the server's handler
        task is cancelled. ``first_timeout`` bounds the wait for the first message (default:
        ``idle_timeout``), ``idle_timeout`` each gap after it, ``timeout`` the total. A chunk
        delivered twice is yielded once; a chunk lost in transit (a later ``seq`` arrives first)
        ends the stream with ``MessagingError`` (reason ``stream_gap``) rather than skip it.
        """
        gen = self._stream(
            topic, body, type=type, encrypt_to=encrypt_to, expect=_expected(expect_from, encrypt_to),
            idle_timeout=self.config.stream_idle_timeout if idle_timeout is None else idle_timeout,
            first_timeout=first_timeout, timeout=timeout, qos=qos,
        )
        return ResponseStream(gen)

    async def _stream(
        self, topic: str, body: Any, *, type: str, encrypt_to: Any, expect: str | None,  # noqa: A002
        idle_timeout: float, first_timeout: float | None, timeout: float | None, qos: int | None,
    ) -> AsyncIterator[Message]:
        loop = asyncio.get_running_loop()
        cid = new_id()
        queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._pending[cid] = _Pending(queue=queue, expect=expect)
        finished = False
        deadline = None if timeout is None else loop.time() + timeout
        try:
            await self.publish(
                topic, body, type=type, qos=qos, encrypt_to=encrypt_to,
                ttl=self.config.request_ttl if timeout is None else timeout, reply_to=self.reply_topic,
                correlation_id=cid, msg_id=cid, credentials=self._creds(),
            )
            next_seq = 0
            got_any = False
            while True:
                gap = first_timeout if first_timeout is not None and not got_any else idle_timeout
                wait = gap if deadline is None else min(gap, deadline - loop.time())
                try:
                    if wait <= 0:
                        raise TimeoutError
                    if queue.empty():  # asyncio.timeout, not wait_for: no extra task per message
                        async with asyncio.timeout(wait):
                            msg = await queue.get()
                    else:
                        msg = queue.get_nowait()
                except TimeoutError:
                    which = "overall" if deadline is not None and loop.time() >= deadline else (
                        "idle" if got_any else "first-message")
                    raise RequestTimeout(f"stream from {topic!r}: {which} timeout") from None
                if msg is None:
                    finished = True
                    raise MessagingError("client closed", reason="closed")
                got_any = True
                if msg.type == CHUNK:
                    if msg.seq is not None and msg.seq < next_seq:  # a redelivered chunk: already yielded
                        logger.info("stream %s: chunk seq %s again (expected %s): dropped", cid, msg.seq, next_seq)
                        continue
                    if msg.seq is not None and msg.seq > next_seq:  # chunks lost in transit: never skip them
                        logger.warning("stream %s: chunk seq %s, expected %s", cid, msg.seq, next_seq)
                        raise MessagingError(f"stream from {topic!r} lost chunks {next_seq}..{msg.seq - 1}",
                                             reason="stream_gap")
                    next_seq = (msg.seq if msg.seq is not None else next_seq) + 1
                    yield msg
                elif msg.type == END:
                    finished = True
                    return
                elif msg.type == ERROR:
                    finished = True
                    raise _remote_error(msg)
                else:  # a plain response: the handler did not stream
                    finished = True
                    yield msg
                    return
        finally:
            self._pending.pop(cid, None)
            if not finished and self.transport.connected:
                try:
                    await self.publish(topic, None, type=CANCEL, correlation_id=cid, ttl=self.config.request_ttl)
                except Exception as exc:  # noqa: BLE001 - best effort
                    logger.info("could not send cancel for %s: %s", cid, exc)

    def _creds(self) -> tuple[Any, ...] | None:
        return self.credentials if self.config.attach_credentials and self.credentials else None

    # ------------------------------------------------------------------ inbound

    def _on_raw(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 0) -> None:
        """The one inbound path: route, drop what no policy accepts, verify once, then dispatch."""
        self.stats.received += 1
        if topic == self.reply_topic:
            if retain:  # replies are never retained state
                self.stats.retained_dropped += 1
                return
            subs: list[Subscription] = []
            state = False
        else:
            subs = self._matching(topic)
            if not subs:
                self.stats.unrouted += 1
                logger.debug("no handler for message on %r", topic)
                return
            if retain:
                subs = [sub for sub in subs if sub.policy.retained is not Retained.DROP]
                if not subs:
                    self.stats.retained_dropped += 1
                    logger.debug("dropped retained message on %r (topic carries no retained state)", topic)
                    return
            state = all(sub.policy.retained is Retained.STATE for sub in subs)
        try:
            msg = self._verifier.open(topic, payload, retained=retain, state=state)
        except RejectedMessage as exc:
            self._reject(topic, exc)
            return
        except Exception as exc:
            logger.exception("unexpected error verifying a message on %r", topic)
            self._reject(topic, RejectedMessage(f"internal error: {exc}", reason="malformed"))
            return
        if topic == self.reply_topic:
            self._on_reply(msg)
            return
        for sub in subs:
            self._dispatch(sub, msg)

    def _reject(self, topic: str, exc: RejectedMessage, msg: Message | None = None, *,
                level: int = logging.WARNING) -> None:
        self.stats.rejected[exc.reason] += 1
        sender = f" from {msg.sender}" if msg is not None else ""
        logger.log(level, "rejected message on %r%s: %s: %.300r", topic, sender, exc.reason, str(exc))
        if self.on_reject is not None:
            try:
                self.on_reject(topic, exc)
            except Exception:
                logger.exception("on_reject hook raised")

    def _on_reply(self, msg: Message) -> None:
        pending = self._pending.get(msg.correlation_id or "")
        if pending is None or msg.type not in _REPLY_TYPES:
            self.stats.unmatched_replies += 1
            logger.debug("unmatched reply %s (cid %s) from %s", msg.type, msg.correlation_id, msg.sender)
            return
        if pending.expect is not None and msg.sender != pending.expect:
            self._reject(msg.topic, WrongSender(f"reply from {msg.sender}, expected {pending.expect}"), msg)
            return
        if pending.future is not None:
            if not pending.future.done():
                pending.future.set_result(msg)
        elif pending.queue is not None:
            pending.queue.put_nowait(msg)

    def _check_policy(self, sub: Subscription, msg: Message) -> tuple[Hashable, Any] | bool | None:
        """Per-subscription checks, cheapest first. False: rejected; else the STATE (key, version)."""
        policy = sub.policy
        if not policy.sender_allowed(msg.sender):
            # a signed message from a sender this subscription does not take (e.g. not yet admitted):
            # routine for shared filters, so logged at INFO; forged signatures stay warnings
            self._reject(msg.topic, WrongSender(f"{msg.sender} may not send on {sub.filter!r}"), msg,
                         level=logging.INFO)
            return False
        if policy.encrypted and not msg.encrypted and not (policy.serve and msg.type == CANCEL):
            self._reject(msg.topic, NotEncrypted(f"{msg.type} on {sub.filter!r} must be end-to-end encrypted"), msg)
            return False
        if policy.serve and msg.expires_at is None:
            self._reject(msg.topic, MissingExpiry(f"request {msg.id} carries no expiry"), msg)
            return False
        state: tuple[Hashable, Any] | None = None
        if policy.retained is Retained.STATE:
            assert policy.order is not None
            try:
                state = policy.order(msg)
                if state is not None:
                    hash(state[0])
            except Exception as exc:  # noqa: BLE001 - a bad state document is malformed, not a crash
                state = None
                logger.debug("order() raised on %r: %s", msg.topic, exc)
            if state is None:
                self._reject(msg.topic, Malformed(f"{msg.type} on {sub.filter!r} has no usable version"), msg)
                return False
            floor = sub.versions.get((msg.sender, state[0]))
            try:
                stale = floor is not None and not state[1] > floor
            except TypeError:
                stale = True
            if stale:
                self.stats.stale_state += 1
                logger.debug("ignoring %s on %r from %s: version %r is not newer than %r",
                             msg.type, msg.topic, msg.sender, state[1], floor)
                return False
        if policy.gate is not None:
            try:
                refusal = policy.gate(msg)
            except Exception:
                logger.exception("gate for %r raised", sub.filter)
                refusal = RejectedMessage("gate failed", reason="gate_error")
            if refusal is not None:
                self._reject(msg.topic, refusal, msg)
                if policy.serve and msg.type != CANCEL:
                    self._spawn(self._safe_error_reply(msg, refusal.reason, str(refusal)))
                return False
        return state if state is not None else True

    def _authorize(self, sub: Subscription, msg: Message) -> bool:
        if sub.require is None:
            return True
        try:
            self.authorizer.authorize(msg, sub.require)
        except NotAuthorized as exc:
            self._reject(msg.topic, exc, msg)
            if sub.serve:
                self._spawn(self._safe_error_reply(msg, exc.reason, "not authorized"))
            return False
        return True

    def _dispatch(self, sub: Subscription, msg: Message) -> None:
        checked = self._check_policy(sub, msg)
        if checked is False:
            return
        if sub.serve and msg.type == CANCEL:
            task = self._serving.get((msg.sender, msg.correlation_id or ""))
            if task is not None:
                logger.info("request %s cancelled by %s", msg.correlation_id, msg.sender)
                task.cancel()
            return
        if sub.serve:
            if msg.type in _REPLY_TYPES:
                logger.debug("ignoring %s sent to request topic %r", msg.type, msg.topic)
                return
            if msg.reply_to is not None and not msg.reply_to.startswith(self.config.reply_prefix):
                self._reject(msg.topic, RejectedMessage(
                    f"reply-to {msg.reply_to!r} is outside {self.config.reply_prefix!r}", reason="bad_reply_to"), msg)
                return
        if not self._authorize(sub, msg):
            return
        if isinstance(checked, tuple):  # accepted state: only now may it raise the floor
            sub.advance(msg.sender, checked[0], checked[1])
        if sub.serve:
            if len(self._serving) >= self.config.max_serving:
                logger.warning("busy: %d requests in progress, refusing %s from %s",
                               len(self._serving), msg.id, msg.sender)
                self._spawn(self._safe_error_reply(msg, "busy", "too many requests in progress"))
                return
            key = (msg.sender, msg.correlation_id or msg.id)
            task = asyncio.ensure_future(self._run_handler(sub, msg, key))
            self._serving[key] = task
            return
        try:
            res = sub.handler(msg)
        except Exception:
            self.stats.handler_errors += 1
            logger.exception("handler for %r raised", sub.filter)
            return
        self.stats.handled += 1
        if inspect.isawaitable(res):
            self._spawn(res)

    def _spawn(self, aw: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.stats.handler_errors += 1
            logger.error("handler task raised", exc_info=task.exception())

    async def _run_handler(self, sub: Subscription, msg: Message, key: tuple[str, str]) -> None:
        try:
            result = sub.handler(msg)
            if inspect.isawaitable(result):
                result = await result
            self.stats.handled += 1
            if msg.reply_to is None:
                if hasattr(result, "__aiter__"):
                    async for _ in result:
                        pass
                return
            if hasattr(result, "__aiter__"):
                seq = 0
                agen = result
                try:
                    async for item in agen:
                        await self._reply(msg, item, type=CHUNK, seq=seq)
                        seq += 1
                finally:
                    aclose = getattr(agen, "aclose", None)
                    if aclose is not None:
                        await aclose()
                await self._reply(msg, None, type=END, seq=seq)
            else:
                await self._reply(msg, result, type=RESPONSE)
        except asyncio.CancelledError:
            logger.info("handler for request %s cancelled", msg.id)
        except MessagingError as exc:
            self.stats.handler_errors += 1
            logger.warning("handler for %r failed: %s: %s", msg.topic, exc.reason, exc)
            await self._safe_error_reply(msg, exc.reason, str(exc))
        except Exception as exc:
            self.stats.handler_errors += 1
            logger.exception("handler for %r raised", msg.topic)
            await self._safe_error_reply(msg, "handler_error", type(exc).__name__)
        finally:
            if self._serving.get(key) is asyncio.current_task():
                del self._serving[key]

    async def _safe_error_reply(self, msg: Message, reason: str, text: str) -> None:
        if msg.reply_to is None:
            return
        try:
            await self._reply(msg, {"reason": reason, "message": text}, type=ERROR)
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not send error reply for %s: %s", msg.id, exc)

    async def _reply(self, req: Message, body: Any, *, type: str, seq: int | None = None) -> None:  # noqa: A002
        assert req.reply_to is not None
        await self.publish(
            req.reply_to, body, type=type, seq=seq, correlation_id=req.correlation_id or req.id,
            encrypt_to=self._verifier.public_key(req.kid) if req.encrypted else None,
        )


class ResponseStream:
    """Async iterator of a stream's response messages; also an async context manager."""

    def __init__(self, gen: AsyncIterator[Message]) -> None:
        self._gen = gen

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._gen

    async def __anext__(self) -> Message:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Stop early (sends ``cancel`` if the stream had not ended)."""
        await self._gen.aclose()  # type: ignore[attr-defined]

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _expected(expect_from: str | None, encrypt_to: Any) -> str | None:
    if expect_from is not None:
        return expect_from.partition("#")[0]
    if isinstance(encrypt_to, PublicKey):
        return encrypt_to.did
    if isinstance(encrypt_to, str):
        return encrypt_to.partition("#")[0]
    return None


def _expire(fut: asyncio.Future[Message], topic: str, timeout: float) -> None:
    if not fut.done():
        fut.set_exception(RequestTimeout(f"no reply from {topic!r} within {timeout}s"))


def _remote_error(msg: Message) -> RemoteError:
    body = msg.body if isinstance(msg.body, dict) else {}
    reason = body.get("reason") if isinstance(body.get("reason"), str) else "remote_error"
    text = body.get("message") if isinstance(body.get("message"), str) else ""
    return RemoteError(f"{msg.sender} answered with an error: {reason}: {text}", reason=reason)


__all__ = [
    "SecureClient",
    "ClientConfig",
    "ClientStats",
    "Subscription",
    "ResponseStream",
    "RESPONSE",
    "ERROR",
    "CHUNK",
    "END",
    "CANCEL",
]
