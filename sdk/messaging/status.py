"""Status lists over MQTT: issuers publish them retained; verifiers read them as a StatusListSource."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from sdk.messaging import topics
from sdk.messaging.client import SecureClient, Subscription
from sdk.messaging.envelope import Message
from sdk.messaging.errors import SubscribeFailed

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
    """A ``StatusListSource`` (``url -> credential``) fed by retained ``coord.status_list`` messages.

    Pass it (or a ``StatusChecker`` built on it) as ``status=`` to ``verify_presentation``;
    listeners are called with ``(url, credential)`` on every update (revocation checks).
    """

    def __init__(self) -> None:
        self._lists: dict[str, Any] = {}
        self._listeners: list[Listener] = []
        self._sub: Subscription | None = None

    def __call__(self, url: str) -> Mapping[str, Any] | str | None:
        return self._lists.get(url)

    def __contains__(self, url: object) -> bool:
        return url in self._lists

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(url, credential)`` when a status list arrives or changes."""
        self._listeners.append(listener)

    def put(self, url: str, credential: Any) -> None:
        """Store a status list credential (also used by a local issuer) and notify listeners."""
        self._lists[url] = credential
        for listener in list(self._listeners):
            try:
                listener(url, credential)
            except Exception:  # noqa: BLE001 - a listener bug must not stop the others
                log.exception("status list listener failed for %s", url)

    async def attach(self, client: SecureClient) -> bool:
        """Subscribe ``client`` to every issuer's status list topic; False if the broker refused."""
        try:
            self._sub = await client.subscribe(ALL_STATUS_LISTS, self._on_message, qos=1)
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
        if self._lists.get(url) == cred:
            return
        self.put(url, cred)


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
