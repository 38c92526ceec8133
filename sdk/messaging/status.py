"""Status lists over MQTT: issuers publish them retained; verifiers read them as a StatusListSource."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from sdk.messaging import topics
from sdk.messaging.client import SecureClient, Subscription
from sdk.messaging.envelope import Message
from sdk.messaging.errors import SubscribeFailed
from sdk.messaging.policy import Retained

log = logging.getLogger(__name__)

Listener = Callable[[str, Any], Any]

#: Message type of a status list credential on ``status/{issuer}`` (retained).
STATUS_LIST = "coord.status_list"
ALL_STATUS_LISTS = topics.ALL_STATUS_LISTS
_URL_PREFIX = "urn:autoglm:status-list:"


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
        if trust is not None:
            from sdk.identity import StatusListStore

            self.store = StatusListStore(trust, resolver=resolver)
            self.store.add_listener(self._notify)
            # a verified source (read live by a StatusChecker) only when it verifies
            self.verified = self.store.verified

    def __call__(self, url: str) -> Mapping[str, Any] | str | None:
        if self.store is not None:
            return self.store(url)
        return self._lists.get(url)

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

    async def attach(self, client: SecureClient) -> bool:
        """Subscribe ``client`` to every issuer's status list topic; False if the broker refused."""
        try:
            self._sub = await client.subscribe(ALL_STATUS_LISTS, self._on_message, qos=1,
                                               retained=Retained.STATE, order=_list_order)
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


__all__ = [
    "MqttStatusListSource", "publish_status_list", "STATUS_LIST", "ALL_STATUS_LISTS",
    "status_list_topic", "status_list_url", "issuer_of_status_url",
]
