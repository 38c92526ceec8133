"""Factories for a coordinator and its devices on one test broker, all stopped by :meth:`aclose`.

    coordinators = CoordinatorFactory(broker, issuer, data_root)
    coordinator = await coordinators(rules=[{...}])             # started, trusted by the issuer
    devices = DeviceFactory(broker, issuer, coordinators)
    phone = await devices(kind="phone", groups=["room:a"], on_config=seen.append)   # admitted
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sdk.identity import Key
from sdk.testing.brokers import TestBroker
from sdk.testing.issuer import TestIssuer
from sdk.testing.waiting import until

log = logging.getLogger(__name__)

Rules = Any  # RuleSet | a list of rule tables (dicts, as in TOML) | a path to a rules TOML file | None


def rule_set(rules: Rules) -> Any:
    """A ``RuleSet`` from a RuleSet, a list of ``[[rules]]`` tables, a TOML path, or None."""
    from sdk.coord.coordinator.rules import RuleSet, load_rules, parse_rules

    if rules is None:
        return RuleSet()
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, str | Path):
        return load_rules(rules)
    if isinstance(rules, Mapping):
        rules = rules.get("rules", [rules])
    return parse_rules(list(rules))


class CoordinatorFactory:
    """``await factory(rules=..., **Coordinator keywords)``: a started coordinator on ``broker``.

    Its credential comes from ``issuer``, it trusts ``issuer`` for device credentials, and the
    issuer's status list is on the broker before it returns. ``events`` records every
    coordinator listener event as ``(what, info)``; :meth:`wait_for` waits for one.
    """

    def __init__(self, broker: TestBroker, issuer: TestIssuer, data_root: Path) -> None:
        self.broker = broker
        self.issuer = issuer
        self.data_root = Path(data_root)
        self.started: list[Any] = []
        self.events: list[tuple[str, dict[str, Any]]] = []

    @property
    def current(self) -> Any:
        """The last coordinator started (None before the first)."""
        return self.started[-1] if self.started else None

    async def __call__(self, rules: Rules = None, *, key: Key | None = None, **options: Any) -> Any:
        from sdk.coord.coordinator import Coordinator

        key = key or Key.generate()
        options.setdefault("data_dir", self.data_root / f"coordinator-{len(self.started)}")
        options.setdefault("trust", self.issuer.trust)
        options.setdefault("credential", self.issuer.coordinator(key))
        options.setdefault("sweep_interval", 0.2)
        for name, value in self.broker.credentials(key).items():
            options.setdefault(name, value)
        coordinator = Coordinator(key, broker=self.broker.url, rules=rule_set(rules), **options)
        coordinator.add_listener(lambda what, info: self.events.append((what, info)))
        await coordinator.start()
        self.started.append(coordinator)
        await self.issuer.publish()
        url = self.issuer.status_url
        await until(lambda: url in coordinator.status_source, 10.0, f"the coordinator holding {url}")
        return coordinator

    async def wait_for(self, what: str, predicate: Callable[[dict[str, Any]], bool] = lambda info: True,
                       timeout: float = 10.0) -> dict[str, Any]:
        """The first event ``what`` whose info matches ``predicate`` (waiting up to ``timeout`` s)."""
        found: list[dict[str, Any]] = []

        def seen() -> bool:
            found[:] = [info for w, info in self.events if w == what and predicate(info)][:1]
            return bool(found)

        try:
            await until(seen, timeout, f"coordinator event {what!r}")
        except AssertionError:
            raise AssertionError(f"no {what!r} event within {timeout}s; saw {[w for w, _ in self.events][-20:]}") \
                from None
        return found[0]

    async def aclose(self) -> None:
        """Stop every coordinator started (last first)."""
        for coordinator in reversed(self.started):
            try:
                await coordinator.stop()
            except Exception:
                log.exception("stopping a test coordinator failed")
        self.started.clear()


class DeviceFactory:
    """``await factory(kind=..., groups=..., on_config=cb)``: a connected device the coordinator admitted.

    The device key is fresh unless given; its credential comes from ``issuer`` (revocable). The
    coordinator is ``coordinator=`` (a Coordinator or its DID), else the last one the coordinator
    factory started, else a new one without rules.
    """

    def __init__(self, broker: TestBroker, issuer: TestIssuer, coordinators: CoordinatorFactory) -> None:
        self.broker = broker
        self.issuer = issuer
        self.coordinators = coordinators
        self.devices: list[Any] = []

    async def __call__(self, kind: str = "device", groups: Sequence[str] = (), *, on_config: Any = None,
                       capabilities: Iterable[str] = (), key: Key | None = None, coordinator: Any = None,
                       credential: Any = None, admitted: bool = True, timeout: float = 10.0,
                       **options: Any) -> Any:
        from sdk.coord.device import Device

        if coordinator is None:
            coordinator = self.coordinators.current or await self.coordinators()
        coordinator_did = coordinator if isinstance(coordinator, str) else coordinator.did
        key = key or Key.generate()
        if credential is None:
            credential = self.issuer.device(key, kind=kind, groups=groups, capabilities=capabilities)
        for name, value in self.broker.credentials(key).items():
            options.setdefault(name, value)
        device = Device(key, credential, broker=self.broker.url, coordinator=coordinator_did,
                        on_config=on_config, **options)
        self.devices.append(device)
        await device.connect(authenticate=admitted)
        if admitted:
            await device.wait_admitted(timeout)
        return device

    async def aclose(self) -> None:
        """Close every device made (last first)."""
        for device in reversed(self.devices):
            try:
                await asyncio.wait_for(device.aclose(), 10.0)
            except Exception:
                log.exception("closing a test device failed")
        self.devices.clear()


__all__ = ["CoordinatorFactory", "DeviceFactory", "rule_set"]
