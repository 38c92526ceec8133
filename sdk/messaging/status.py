"""Status lists over MQTT: issuers publish them retained; verifiers read them as a StatusListSource.

A retained message is not delivered everywhere on every broker (an ejabberd cluster hands it only
to subscriptions made on the node it was published through), so a publisher
(:class:`StatusListPublisher`) also re-publishes its lists every ``REPUBLISH_INTERVAL`` (jittered)
and answers ``STATUS_GET`` requests on a topic it serves; a verifier lacking a list asks for it
(:meth:`MqttStatusListSource.request`, or automatically with :meth:`~MqttStatusListSource.ask_when_missing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from sdk.messaging import topics
from sdk.messaging.client import SecureClient, Subscription
from sdk.messaging.envelope import Message
from sdk.messaging.errors import MessagingError, RejectedMessage, SubscribeFailed
from sdk.messaging.policy import Retained

log = logging.getLogger(__name__)

Listener = Callable[[str, Any], Any]

#: Message type of a status list credential on ``status/{issuer}`` (retained).
STATUS_LIST = "coord.status_list"
ALL_STATUS_LISTS = topics.ALL_STATUS_LISTS
#: Request type: "send me status list ``url``" (body ``{"url": ...}``); the reply body is the credential.
STATUS_GET = "coord.status_get"
#: Seconds between re-publications of a held list (each delay jittered by ``REPUBLISH_JITTER``).
REPUBLISH_INTERVAL = 30.0
REPUBLISH_JITTER = 0.2
_URL_PREFIX = "urn:autoglm:status-list:"
#: a verifier asks for one missing list at most this often (seconds)
_ASK_INTERVAL = 1.0
_MAX_TRACKED = 10_000


def status_list_topic(issuer_did: str) -> str:
    """Where ``issuer_did`` publishes its status list credential (retained)."""
    return topics.status_list(topics.client_token(issuer_did))


def status_list_url(issuer_did: str) -> str:
    """The id (URL) of the status list credential an issuer publishes over MQTT."""
    return f"{_URL_PREFIX}{topics.client_token(issuer_did)}"


def issuer_of_status_url(url: str) -> str | None:
    """The did:key token in a ``urn:autoglm:status-list:...`` URL (None for other URLs)."""
    return url[len(_URL_PREFIX):] if url.startswith(_URL_PREFIX) else None


class MqttStatusListSource:
    """Status lists distributed over MQTT: retained ``coord.status_list`` messages on ``status/{issuer}``.

    One service for the coordinator, devices and mesh nodes alike. With ``trust`` (the issuers
    whose lists count) it keeps an :class:`sdk.identity.StatusListStore`: a list is taken only if
    its proof verifies, its issuer is trusted, it is currently valid and strictly newer than the
    list held (signed ``validFrom``, then sequence), so re-delivering or relaying an old list can
    never roll a revocation back. Without ``trust`` it holds whatever arrives last, for callers
    that verify and order lists themselves (a ``StatusChecker`` on top never goes back either).

    It is a ``StatusListSource`` (``source(url)``) and, with ``trust`` only, a verified source
    (``source.verified(url)``) that a ``StatusChecker`` reads live; listeners get ``(url, credential)`` after each accepted list.
    """

    def __init__(self, trust: Any = None, *, resolver: Any = None) -> None:
        self._lists: dict[str, Any] = {}
        self._listeners: list[Listener] = []
        self._sub: Subscription | None = None
        self.store: Any = None
        self._ask: tuple[SecureClient, Callable[[str], str | None]] | None = None
        self._asked: dict[str, float] = {}
        self._ask_tasks: set[asyncio.Task[None]] = set()
        if trust is not None:
            from sdk.identity import StatusListStore

            self.store = StatusListStore(trust, resolver=resolver)
            self.store.add_listener(self._notify)
            # a verified source (read live by a StatusChecker) only when it verifies
            self.verified = self.store.verified

    def __call__(self, url: str) -> Mapping[str, Any] | str | None:
        found = self.store(url) if self.store is not None else self._lists.get(url)
        if found is None:
            self._ask_for(url)
        return found

    def __contains__(self, url: object) -> bool:
        return url in (self.store if self.store is not None else self._lists)

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(url, credential)`` when a status list is accepted."""
        self._listeners.append(listener)

    def put(self, url: str, credential: Any) -> bool:
        """Take a status list from elsewhere (a local issuer, a file) as if it had arrived; True if taken."""
        if self.store is not None:
            return bool(self.store.offer(credential))
        if self._lists.get(url) == credential:
            return False
        self._lists[url] = credential
        self._notify(url, credential)
        return True

    def _notify(self, url: str, credential: Any) -> None:
        for listener in list(self._listeners):
            try:
                listener(url, credential)
            except Exception:
                log.exception("status list listener failed for %s", url)

    # -- asking for a missing list (clustered brokers that do not deliver retained lists everywhere)
    async def request(self, client: SecureClient, url: str, *, topic: str, timeout: float = 5.0) -> bool:
        """Ask whoever serves ``topic`` (a :class:`StatusListPublisher`) for list ``url`` and take the
        answer like a published one (verified and ordered with ``trust``); True if it was taken."""
        reply = await client.request(topic, {"url": url}, type=STATUS_GET, timeout=timeout)
        cred = reply.body
        if not isinstance(cred, Mapping) or cred.get("id") != url or _issuer(cred) is None \
                or status_list_url(_issuer(cred) or "") != url:
            log.warning("status list reply from %s for %s is not that list; ignored", reply.sender, url)
            return False
        return self.put(url, dict(cred))

    def ask_when_missing(self, client: SecureClient, topic: Callable[[str], str | None]) -> None:
        """From now on a lookup of a list this source lacks asks for it in the background on
        ``topic(url)`` (None: nobody to ask), at most once a second per list; the lookup itself
        still fails closed, the next one finds the list."""
        self._ask = (client, topic)
        if self.store is not None:
            self.verified = self._verified_or_ask

    def _verified_or_ask(self, url: str) -> Any:
        found = self.store.verified(url)
        if found is None:
            self._ask_for(url)
        return found

    def _ask_for(self, url: str) -> None:
        if self._ask is None:
            return
        client, topic_of = self._ask
        now = time.monotonic()
        if now - self._asked.get(url, -_ASK_INTERVAL) < _ASK_INTERVAL:
            return
        if len(self._asked) >= _MAX_TRACKED:
            self._asked.clear()
        self._asked[url] = now
        topic = topic_of(url)
        if topic is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def ask_once() -> None:
            try:
                await self.request(client, url, topic=topic)
            except MessagingError as exc:
                log.info("status list %s not obtained from %s: %s", url, topic, exc.reason)

        task = loop.create_task(ask_once())
        self._ask_tasks.add(task)
        task.add_done_callback(self._ask_tasks.discard)
    # -- end asking for a missing list

    async def attach(self, client: SecureClient, *, local: bool = False) -> bool:
        """Subscribe ``client`` to every issuer's status list topic; False if the broker refused.
        ``local=True``: the lists come through the caller's :meth:`SecureClient.cover` of
        :data:`~sdk.messaging.topics.STATUS_TREE` (attach before covering)."""
        try:
            self._sub = await client.subscribe(ALL_STATUS_LISTS, self._on_message, qos=1,
                                               retained=Retained.STATE, order=_list_order, local=local)
        except SubscribeFailed as exc:
            log.warning("status lists unavailable over MQTT (%s): broker ACL refused %s",
                        exc.reason, ALL_STATUS_LISTS)
            return False
        return True

    def _on_message(self, msg: Message) -> None:
        if msg.type != STATUS_LIST:
            return
        cred = msg.body
        url = cred.get("id") if isinstance(cred, Mapping) else None
        issuer = cred.get("issuer") if isinstance(cred, Mapping) else None
        if isinstance(issuer, Mapping):
            issuer = issuer.get("id")
        try:
            expected = status_list_url(issuer) if isinstance(issuer, str) else None
            on_topic = isinstance(issuer, str) and msg.topic == status_list_topic(issuer)
        except (TypeError, ValueError):
            expected, on_topic = None, False
        if not isinstance(url, str) or url != expected or not on_topic:
            log.warning("ignoring status list relayed by %s: id %r / topic %r do not match its issuer",
                        msg.sender, url, msg.topic)
            return
        self.put(url, cred)


def _list_order(msg: Message) -> tuple[str, tuple[float, int]] | None:
    """Status lists are state, ordered per relaying sender by the list's own signed ``validFrom``
    and sequence (read unverified here; the store re-checks both after verifying the proof)."""
    from sdk.identity.status_list import status_list_order

    cred = msg.body
    url = cred.get("id") if isinstance(cred, Mapping) else None
    if not isinstance(url, str):
        return None
    order = status_list_order(cred)
    if order is None:
        return None
    return url, (order[0].timestamp(), order[1])


async def publish_status_list(client: SecureClient, credential: Mapping[str, Any]) -> None:
    """Publish (or relay) a signed status list credential, retained, on its issuer's topic."""
    issuer = credential.get("issuer")
    if isinstance(issuer, Mapping):
        issuer = issuer.get("id")
    if not isinstance(issuer, str) or credential.get("id") != status_list_url(issuer):
        raise ValueError("status list id must be status_list_url(issuer)")
    await client.publish(status_list_topic(issuer), dict(credential), type=STATUS_LIST,
                         retain=True, qos=1)


def _issuer(credential: Mapping[str, Any]) -> str | None:
    issuer = credential.get("issuer")
    if isinstance(issuer, Mapping):
        issuer = issuer.get("id")
    return issuer if isinstance(issuer, str) else None


def republish_delay(interval: float = REPUBLISH_INTERVAL, jitter: float = REPUBLISH_JITTER) -> float:
    """``interval`` spread by ``±jitter`` (a fraction), so publishers do not re-publish in lock-step."""
    return interval * (1.0 + random.uniform(-jitter, jitter))


class StatusListPublisher:
    """Publishes status lists retained, re-publishes each every ``interval`` seconds (jittered;
    0 = never) and answers ``STATUS_GET`` requests for them.

    ``put(credential)`` holds the newest signed list of a URL (published at once with
    ``publish=True``); ``start()`` runs the re-publication loop; ``serve(topic)`` answers requests
    on ``topic`` (the publisher's own inbox, say), or a host that already serves a topic registers
    :meth:`answer` as the handler of ``STATUS_GET`` there. Re-delivering a list is harmless: a
    verifier keeps only a strictly newer one.
    """

    def __init__(self, client: SecureClient, *, interval: float = REPUBLISH_INTERVAL,
                 jitter: float = REPUBLISH_JITTER) -> None:
        if interval < 0 or not 0 <= jitter < 1:
            raise ValueError("interval must be >= 0 and jitter in [0, 1)")
        self.client = client
        self.interval = interval
        self.jitter = jitter
        self.lists: dict[str, dict[str, Any]] = {}
        self.republished = 0
        self.answered = 0
        self._task: asyncio.Task[None] | None = None
        self._asked: dict[tuple[str, str], float] = {}

    async def put(self, credential: Mapping[str, Any], *, publish: bool = True) -> None:
        """Hold ``credential`` (a status list whose id is ``status_list_url(issuer)``), publish it now."""
        issuer = _issuer(credential)
        if issuer is None or credential.get("id") != status_list_url(issuer):
            raise ValueError("status list id must be status_list_url(issuer)")
        self.lists[str(credential["id"])] = dict(credential)
        if publish:
            await publish_status_list(self.client, credential)

    async def publish(self) -> None:
        """Publish every held list again (retained)."""
        for credential in list(self.lists.values()):
            await publish_status_list(self.client, credential)

    def start(self) -> None:
        """Start re-publishing every ``interval`` (jittered)."""
        if self._task is None and self.interval > 0:
            self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(republish_delay(self.interval, self.jitter))
            try:
                await self.publish()
                self.republished += 1
            except MessagingError as exc:      # disconnected: the transport re-announces on reconnect
                log.info("status list re-publication skipped: %s", exc.reason)

    def answer(self, msg: Message) -> dict[str, Any]:
        """The reply to a ``STATUS_GET`` request: the held list it names."""
        body = msg.body if isinstance(msg.body, dict) else {}
        url = body.get("url")
        credential = self.lists.get(url) if isinstance(url, str) else None
        if credential is None:
            raise MessagingError(f"no status list {url!r} published here", reason="unknown_status_list")
        self.answered += 1
        return credential

    def _gate(self, msg: Message) -> RejectedMessage | None:
        """A sender may ask for one list about once a second (bounded memory)."""
        if msg.type != STATUS_GET:
            return RejectedMessage(f"{msg.type!r} is not a status list request", reason="unknown_command")
        body = msg.body if isinstance(msg.body, dict) else {}
        key = (msg.sender, str(body.get("url"))[:256])
        now = time.monotonic()
        if now - self._asked.get(key, -_ASK_INTERVAL) < _ASK_INTERVAL / 2:
            return RejectedMessage("status list asked for too often", reason="busy")
        if len(self._asked) >= _MAX_TRACKED:
            self._asked.clear()
        self._asked[key] = now
        return None

    async def serve(self, topic: str) -> Subscription:
        """Answer ``STATUS_GET`` requests on ``topic``."""
        return await self.client.serve(topic, self.answer, gate=self._gate, qos=1)

    async def aclose(self) -> None:
        """Stop re-publishing."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None


__all__ = [
    "StatusListPublisher", "STATUS_GET", "REPUBLISH_INTERVAL", "republish_delay",
    "MqttStatusListSource", "publish_status_list", "STATUS_LIST", "ALL_STATUS_LISTS",
    "status_list_topic", "status_list_url", "issuer_of_status_url",
]
