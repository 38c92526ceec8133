"""A verified config as the app sees it: the coordinator's signed document plus ack/fail."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from sdk.coord import protocol
from sdk.coord.protocol import ConfigVersion


@dataclass(eq=False)
class Config:
    """One config version for this device, checked before the app sees it.

    With ``on_config`` the callback's return means applied and an exception failed; with
    ``async for cfg in device.configs()`` the app calls :meth:`ack` or :meth:`fail`.
    """

    document: ConfigVersion
    received_at: float = 0.0
    _done: asyncio.Future[tuple[str, str | None]] | None = field(default=None, repr=False)

    @property
    def version(self) -> int:
        return self.document.version

    @property
    def changes(self) -> dict[str, Any]:
        """What changed since the previous version (``None`` removes a key)."""
        return self.document.changes

    @property
    def state(self) -> dict[str, Any]:
        """The whole desired state at this version."""
        return self.document.state

    @property
    def event_id(self) -> str | None:
        """The event that caused this version, if any."""
        return self.document.event_id

    @property
    def rules(self) -> tuple[str, ...]:
        """The rules that produced it."""
        return self.document.rules

    async def ack(self) -> None:
        """Report this version applied."""
        if self._done is not None and not self._done.done():
            self._done.set_result((protocol.APPLIED, None))

    async def fail(self, reason: str) -> None:
        """Report this version failed (``reason`` goes to the coordinator)."""
        if self._done is not None and not self._done.done():
            self._done.set_result((protocol.FAILED, str(reason)[:200]))


__all__ = ["Config"]
