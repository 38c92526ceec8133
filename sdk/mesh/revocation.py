"""Live status lists for mesh peers: the shared MQTT status-list service feeding a checker.

Nodes and routers follow their issuers' status lists as they are published
(:class:`sdk.messaging.status.MqttStatusListSource`), not a file read once: each new list is
verified into the :class:`StatusChecker` their credential checks use, then listeners run (the
node and the router drop cached grants and re-check at once, so a revocation takes effect on
the next message instead of after a cache lifetime). A seed (``--status-file``: ``{url: list
credential}``, a callable source or an existing ``StatusChecker``) answers until a live list
arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from sdk.identity import IdentityError, StatusChecker
from sdk.messaging.client import SecureClient
from sdk.messaging.status import MqttStatusListSource

log = logging.getLogger(__name__)

#: ``listener(status_list_url)``: called after the checker holds the new list.
StatusListener = Callable[[str], None]


class LiveStatus:
    """A ``StatusChecker`` kept current by status lists arriving over MQTT (``attach(client)``)."""

    def __init__(self, seed: StatusChecker | Callable[[str], Any] | Mapping[str, Any] | None = None, *,
                 resolver: Any = None) -> None:
        self.source = MqttStatusListSource()
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
        self.updates = 0  # verified lists taken
        self.rejected = 0  # lists that did not verify
        self._listeners: list[StatusListener] = []
        self.source.add_listener(self._on_list)

    def add_listener(self, listener: StatusListener) -> None:
        """Call ``listener(url)`` after each verified status list update."""
        self._listeners.append(listener)

    async def attach(self, client: SecureClient) -> bool:
        """Follow every issuer's status list on ``client``'s broker; False if the broker refused."""
        return await self.source.attach(client)

    def put(self, url: str, credential: Any) -> None:
        """Take a status list from elsewhere (a local issuer, a file) as if it had arrived live."""
        self.source.put(url, credential)

    def _on_list(self, url: str, credential: Any) -> None:
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


__all__ = ["LiveStatus", "StatusListener"]
