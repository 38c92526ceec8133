"""Live status lists for mesh peers: the shared MQTT status-list service feeding a checker.

Nodes and routers follow their issuers' status lists as they are published
(:class:`sdk.messaging.status.MqttStatusListSource`), not a file read once: each new list is
verified and ordered by the shared source (never going back to an older list) and read by the
:class:`StatusChecker` their credential checks use, then listeners run (the node and the router
drop cached grants and re-check at once, so a revocation takes effect on the next message
instead of after a cache lifetime). A seed (``--status-file``: ``{url: list
credential}``, a callable source or an existing ``StatusChecker``) answers until a live list
arrives.

A clustered broker may not deliver a retained list to a subscription made on another node, so a
lookup of a list not held yet asks its publisher for it at once (``coord.status_get``, answered by
a :class:`~sdk.messaging.status.StatusListPublisher` or a coordinator) instead of waiting for the
next re-publication: by default on the issuer's own inbox ``autoglm/v1/dev/{issuer}/cmd``, or
where ``ask`` says (``{issuer DID: topic}`` or ``url -> topic``; ``False``: never ask). That lookup
still fails closed; the next one, once the answer is in, finds the list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from sdk.identity import IdentityError, StatusChecker, TrustPolicy
from sdk.messaging import topics
from sdk.messaging.client import SecureClient
from sdk.messaging.status import MqttStatusListSource, issuer_of_status_url

log = logging.getLogger(__name__)

#: ``listener(status_list_url)``: called after the checker holds the new list.
StatusListener = Callable[[str], None]
#: where to ask for a missing list: ``{issuer DID: topic}``, ``url -> topic or None``, or False (never)
AskFor = Mapping[str, str] | Callable[[str], str | None] | bool


def issuer_inbox(url: str) -> str | None:
    """The default place to ask for status list ``url``: its issuer's ``dev/{token}/cmd`` topic."""
    token = issuer_of_status_url(url)
    if not token:
        return None
    try:
        return topics.build("dev", token, "cmd")
    except ValueError:
        return None


class LiveStatus:
    """A ``StatusChecker`` kept current by status lists arriving over MQTT (``attach(client)``).

    With ``trust`` (the policy's issuers) and no seed, or a ``{url: list}`` seed, the lists are
    kept by the shared source's :class:`~sdk.identity.StatusListStore`: only verified lists of
    trusted issuers, each strictly newer than the one held (a re-delivered or relayed old list
    never rolls a revocation back), read live by the checker. A ``StatusChecker`` or callable
    seed keeps its own fetching; lists arriving over MQTT are pushed into its checker.
    """

    def __init__(self, seed: StatusChecker | Callable[[str], Any] | Mapping[str, Any] | None = None, *,
                 trust: TrustPolicy | None = None, resolver: Any = None, ask: AskFor = True) -> None:
        self.ask = ask
        self.updates = 0  # lists taken
        self.rejected = 0  # lists pushed into a seed's checker that it refused
        self._listeners: list[StatusListener] = []
        if (seed is None or isinstance(seed, Mapping)) and trust is not None:
            self.source = MqttStatusListSource(trust, resolver=resolver)
            self.checker = StatusChecker(self.source, resolver=resolver)
            self._push = False
            for url, credential in dict(seed or {}).items():
                if not self.source.put(url, credential):
                    log.warning("status list seed %s not taken (not a newer valid list of a trusted issuer)", url)
        else:
            self.source = MqttStatusListSource()
            self._push = True
            if isinstance(seed, StatusChecker):
                self.checker = seed
            else:
                fallback: Callable[[str], Any] | None
                if isinstance(seed, Mapping):
                    fallback = dict(seed).get
                elif callable(seed):
                    fallback = seed
                elif seed is None:
                    fallback = None
                else:
                    raise TypeError("status seed must be a StatusChecker, a callable url -> credential, or a dict")

                def fetch(url: str) -> Any:
                    live = self.source(url)
                    if live is not None or fallback is None:
                        return live
                    return fallback(url)

                self.checker = StatusChecker(fetch, resolver=resolver)
        self.source.add_listener(self._on_list)

    def add_listener(self, listener: StatusListener) -> None:
        """Call ``listener(url)`` after each status list taken."""
        self._listeners.append(listener)

    async def attach(self, client: SecureClient) -> bool:
        """Follow every issuer's status list on ``client``'s broker (and ask on it for a list not
        held yet, as ``ask`` says); False if the broker refused the subscription."""
        topic_of = self._topic_of()
        if topic_of is not None:
            self.source.ask_when_missing(client, topic_of)
        return await self.source.attach(client)

    def _topic_of(self) -> Callable[[str], str | None] | None:
        ask = self.ask
        if ask is False:
            return None
        if ask is True:
            return issuer_inbox
        if isinstance(ask, Mapping):
            by_issuer = {topics.client_token(did): topic for did, topic in ask.items()}
            return lambda url: by_issuer.get(issuer_of_status_url(url) or "")
        return ask

    def put(self, url: str, credential: Any) -> None:
        """Take a status list from elsewhere (a local issuer, a file) as if it had arrived live."""
        self.source.put(url, credential)

    def _on_list(self, url: str, credential: Any) -> None:
        if self._push:
            try:
                self.checker.update(url, credential)
            except IdentityError as exc:
                self.rejected += 1
                log.warning("status list %s rejected: %s: %s", url, exc.reason, exc)
                return
        self.updates += 1
        log.info("status list %s updated", url)
        for listener in list(self._listeners):
            try:
                listener(url)
            except Exception:  # one listener's bug must not stop revocation elsewhere
                log.exception("status listener failed for %s", url)


__all__ = ["AskFor", "LiveStatus", "StatusListener", "issuer_inbox"]
