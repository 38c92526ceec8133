"""Testing apps built on the SDK: real brokers, issuers, coordinators, devices, a fake engine.

    TestBroker / running_broker (brokers.py)    an embedded amqtt or Mosquitto broker on loopback
    TestIssuer (issuer.py)                      every credential type, revocable via a status list
    CoordinatorFactory, DeviceFactory           a started coordinator; connected, admitted devices
      (coordination.py)
    FakeEngine (fake_engine.py)                 the Engine interface without torch or a model
    Sniffer (sniffer.py)                        what crossed the broker, as raw bytes
    until (waiting.py)                          wait for a condition instead of sleeping
    plugin.py                                   the pytest plugin (fixtures autoglm_*; docs/TESTING.md)

Imported only by test suites. Names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sdk._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "TestBroker": "sdk.testing.brokers",
    "BrokerUnavailable": "sdk.testing.brokers",
    "running_broker": "sdk.testing.brokers",
    "mosquitto_installed": "sdk.testing.brokers",
    "TestIssuer": "sdk.testing.issuer",
    "CoordinatorFactory": "sdk.testing.coordination",
    "DeviceFactory": "sdk.testing.coordination",
    "FakeEngine": "sdk.testing.fake_engine",
    "FakeTokenizer": "sdk.testing.fake_engine",
    "Sniffer": "sdk.testing.sniffer",
    "SniffedMessage": "sdk.testing.sniffer",
    "until": "sdk.testing.waiting",
}
_SUBMODULES = {"brokers", "issuer", "coordination", "fake_engine", "sniffer", "waiting", "plugin"}

__all__ = [
    "TestBroker",
    "BrokerUnavailable",
    "running_broker",
    "mosquitto_installed",
    "TestIssuer",
    "CoordinatorFactory",
    "DeviceFactory",
    "FakeEngine",
    "FakeTokenizer",
    "Sniffer",
    "SniffedMessage",
    "until",
]

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS, _SUBMODULES)

if TYPE_CHECKING:
    from sdk.testing.brokers import BrokerUnavailable, TestBroker, mosquitto_installed, running_broker
    from sdk.testing.coordination import CoordinatorFactory, DeviceFactory
    from sdk.testing.fake_engine import FakeEngine, FakeTokenizer
    from sdk.testing.issuer import TestIssuer
    from sdk.testing.sniffer import SniffedMessage, Sniffer
    from sdk.testing.waiting import until
