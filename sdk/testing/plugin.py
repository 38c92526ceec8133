"""The ``autoglm`` pytest plugin: brokers, issuers, coordinators, devices, a fake engine, a sniffer.

Installed with ``pip install 'open-autoglm-sdk[testing]'`` and loaded by pytest through the
``pytest11`` entry point (or ``-p sdk.testing.plugin``). Fixtures (each function-scoped):

    autoglm_broker        a running broker (embedded amqtt; Mosquitto with --autoglm-broker=mosquitto,
                          @pytest.mark.autoglm_broker("mosquitto"), or parametrized indirectly):
                          .url .kind .restart() .credentials(key)
    autoglm_issuer        a TestIssuer: device/coordinator/operator/access/node credentials, revoke(), trust
    autoglm_coordinator   await autoglm_coordinator(rules=[...]) -> a started Coordinator
    autoglm_device        await autoglm_device(kind=, groups=, on_config=) -> a connected, admitted Device
    autoglm_fake_engine   a FakeEngine (the Engine interface, no torch)
    autoglm_sniffer       a Sniffer subscribed to "#" on autoglm_broker

docs/TESTING.md has worked examples. The module imports only pytest: the SDK loads when a
fixture is first used, so the plugin costs nothing in test runs that do not use it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

KINDS = ("embedded", "mosquitto")
_HINT = "pip install 'open-autoglm-sdk[testing]'"

try:
    import pytest_asyncio

    _async_fixture: Callable[..., Any] = pytest_asyncio.fixture
except ImportError:  # the plugin loads wherever the SDK is installed: fail only the tests that use it

    def _async_fixture(fn: Callable[..., Any]) -> Any:
        def missing() -> None:
            pytest.fail(f"{fn.__name__} needs pytest-asyncio: {_HINT}", pytrace=False)

        missing.__doc__ = fn.__doc__
        return pytest.fixture(name=fn.__name__)(missing)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("autoglm", "open-autoglm-sdk test fixtures")
    group.addoption("--autoglm-broker", choices=KINDS, default=None,
                    help="broker kind the autoglm_broker fixture starts (default: the autoglm_broker ini "
                         "value, else embedded)")
    parser.addini("autoglm_broker", "broker kind the autoglm_broker fixture starts: embedded or mosquitto",
                  default="embedded")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "autoglm_broker(kind): run this test's autoglm_broker on 'embedded' or "
                                       "'mosquitto'")


def broker_kind(request: pytest.FixtureRequest) -> str:
    """The broker kind for this test: an indirect parameter, the marker, --autoglm-broker, the ini value."""
    marker = request.node.get_closest_marker("autoglm_broker")
    if hasattr(request, "param"):
        kind = request.param
    elif marker is not None:
        kind = marker.args[0] if marker.args else marker.kwargs.get("kind", "embedded")
    else:
        kind = request.config.getoption("--autoglm-broker") or request.config.getini("autoglm_broker")
    if kind not in KINDS:
        raise pytest.UsageError(f"autoglm_broker: broker kind must be one of {KINDS}, not {kind!r}")
    return str(kind)


@_async_fixture
async def autoglm_broker(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A broker for this test on a free loopback port, stopped after (skipped when Mosquitto is absent)."""
    from sdk.testing.brokers import BrokerUnavailable, running_broker

    kind = broker_kind(request)
    try:
        context = running_broker(kind)
        broker = await context.__aenter__()
    except BrokerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield broker
    finally:
        for close in reversed(broker.cleanups):
            await close()
        await context.__aexit__(None, None, None)


@pytest.fixture
def autoglm_issuer(request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh issuer key (``TestIssuer``); with ``autoglm_broker`` in the test, it publishes there."""
    from sdk.testing.issuer import TestIssuer

    issuer = TestIssuer()
    if "autoglm_broker" in request.fixturenames:
        broker = request.getfixturevalue("autoglm_broker")
        issuer.bind(broker.url, broker.credentials(issuer.key))
        broker.cleanups.append(issuer.aclose)  # its client closes on the broker's loop, before the broker
    yield issuer


@_async_fixture
async def autoglm_coordinator(autoglm_broker: Any, autoglm_issuer: Any, tmp_path: Path) -> AsyncIterator[Any]:
    """``await autoglm_coordinator(rules=[...])``: a started Coordinator trusted by ``autoglm_issuer``."""
    from sdk.testing.coordination import CoordinatorFactory

    factory = CoordinatorFactory(autoglm_broker, autoglm_issuer, tmp_path / "autoglm")
    try:
        yield factory
    finally:
        await factory.aclose()


@_async_fixture
async def autoglm_device(autoglm_broker: Any, autoglm_issuer: Any, autoglm_coordinator: Any) -> AsyncIterator[Any]:
    """``await autoglm_device(kind="phone", groups=["room:a"], on_config=cb)``: an admitted Device."""
    from sdk.testing.coordination import DeviceFactory

    factory = DeviceFactory(autoglm_broker, autoglm_issuer, autoglm_coordinator)
    try:
        yield factory
    finally:
        await factory.aclose()


@pytest.fixture
def autoglm_fake_engine() -> Iterator[Any]:
    """A ``FakeEngine`` serving ``fake-model``: replies ``"Echo: <prompt>"``, one character per token."""
    from sdk.testing.fake_engine import FakeEngine

    engine = FakeEngine()
    yield engine
    engine.close()


@_async_fixture
async def autoglm_sniffer(autoglm_broker: Any) -> AsyncIterator[Any]:
    """A ``Sniffer`` subscribed to ``#`` on ``autoglm_broker`` before the test starts."""
    from sdk.identity import Key
    from sdk.testing.sniffer import Sniffer

    sniffer = Sniffer(autoglm_broker.url, **autoglm_broker.credentials(Key.generate()))
    await sniffer.start()
    try:
        yield sniffer
    finally:
        await sniffer.aclose()
