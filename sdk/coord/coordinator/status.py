"""Status lists over MQTT: issuers publish them retained; verifiers read them as a StatusListSource."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from sdk.coord.client import SecureClient, Subscription
from sdk.coord.coordinator import protocol
from sdk.coord.envelope import Message
from sdk.coord.errors import SubscribeFailed

log = logging.getLogger(__name__)

Listener = Callable[[str, Any], Any]


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
            self._sub = await client.subscribe(protocol.ALL_STATUS_LISTS, self._on_message, qos=1)
        except SubscribeFailed as exc:
            log.warning("status lists unavailable over MQTT (%s): broker ACL refused %s",
                        exc.reason, protocol.ALL_STATUS_LISTS)
            return False
        return True

    def _on_message(self, msg: Message) -> None:
        if msg.type != protocol.STATUS_LIST:
            return
        cred = msg.body
        url = cred.get("id") if isinstance(cred, Mapping) else None
        issuer = cred.get("issuer") if isinstance(cred, Mapping) else None
        if isinstance(issuer, Mapping):
            issuer = issuer.get("id")
        try:
            expected = protocol.status_list_url(issuer) if isinstance(issuer, str) else None
            on_topic = isinstance(issuer, str) and msg.topic == protocol.status_list_topic(issuer)
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
    if not isinstance(issuer, str) or credential.get("id") != protocol.status_list_url(issuer):
        raise ValueError("status list id must be protocol.status_list_url(issuer)")
    await client.publish(protocol.status_list_topic(issuer), dict(credential), type=protocol.STATUS_LIST,
                         retain=True, qos=1)


__all__ = ["MqttStatusListSource", "publish_status_list"]
