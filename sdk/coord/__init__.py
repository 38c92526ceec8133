"""Coordination: devices, the coordinator daemon and the protocol they share.

    Device / SyncDevice (device/)      the device SDK: mutual DID+VP admission, events, configs
    Coordinator (coordinator/)         admits devices, runs rules, pushes signed configs
    OperatorClient (operator.py)       an operator's signed requests: fleet queries, desired state
    protocol.py                        message types, device topics, the config document (shared)
    handshake.py, errors.py            the DID+VP handshake and the errors both sides use
    events.py                          typed device events

Built on ``sdk.messaging``; docs/COORDINATOR.md. Names load on first use, so importing the
device SDK does not load the coordinator's SQLite store or metrics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdk._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "Coordinator": "sdk.coord.coordinator",
    "Device": "sdk.coord.device",
    "SyncDevice": "sdk.coord.device",
    "Config": "sdk.coord.device",
    "OperatorClient": "sdk.coord.operator",
    "SyncOperatorClient": "sdk.coord.operator",
}
_SUBMODULES = {"events", "protocol", "device", "coordinator", "handshake", "errors", "operator"}

__all__ = [
    "Config",
    "Coordinator",
    "Device",
    "OperatorClient",
    "SyncDevice",
    "SyncOperatorClient",
    "events",
    "protocol",
]


__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, _SUBMODULES)


if TYPE_CHECKING:
    from sdk.coord import events, protocol
    from sdk.coord.coordinator import Coordinator
    from sdk.coord.device import Config, Device, SyncDevice
    from sdk.coord.operator import OperatorClient, SyncOperatorClient
