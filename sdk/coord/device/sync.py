"""A blocking facade over :class:`~sdk.coord.device.Device` for apps without an event loop.

The device runs on a private :class:`~sdk.messaging.loop_thread.LoopThread`; ``on_config``
callbacks and command handlers run on that thread.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from sdk.coord.device.client import Credential, Device
from sdk.coord.device.commands import CommandHandler, H
from sdk.coord.device.state import DeviceState
from sdk.coord.events import Event
from sdk.messaging.loop_thread import LoopThread

T = TypeVar("T")


class SyncDevice:
    """``with SyncDevice(key, credential, broker=..., coordinator=...) as dev: dev.publish_event(ev)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lt = LoopThread("autoglm-device")
        try:
            self.device: Device = self._call(_make_device(args, kwargs))
        except BaseException:
            self._lt.stop()
            raise

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        return self._lt.call(coro, timeout)

    def __enter__(self) -> SyncDevice:
        try:
            self._call(self.device.connect())
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def state(self) -> DeviceState:
        """:attr:`Device.state`."""
        return self.device.state

    def publish_event(self, event: Event) -> str:
        """Blocking :meth:`Device.publish_event`."""
        return self._call(self.device.publish_event(event))

    def wait_version(self, version: int, timeout: float | None = None) -> None:
        """Blocking :meth:`Device.wait_version`."""
        self._call(self.device.wait_version(version, timeout), None)

    def report_properties(self, properties: Mapping[str, Any]) -> None:
        """Blocking :meth:`Device.report_properties`."""
        self._call(self.device.report_properties(properties))

    def register_command(self, name: str, handler: CommandHandler) -> None:
        """:meth:`Device.register_command`; the handler runs on the device's loop thread."""
        self.device.register_command(name, handler)

    def command(self, name: str) -> Callable[[H], H]:
        """Decorator form of :meth:`register_command`."""
        return self.device.commands.command(name)

    def update_credential(self, credential: Credential) -> None:
        """:meth:`Device.update_credential`, run on the device's loop."""
        self._call(_update(self.device, credential))

    def close(self) -> None:
        """Disconnect and stop the loop thread."""
        if self._lt.running:
            try:
                self._call(self.device.aclose(), 10)
            finally:
                self._lt.stop()


async def _make_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Device:
    return Device(*args, **kwargs)


async def _update(device: Device, credential: Credential) -> None:
    device.update_credential(credential)


__all__ = ["SyncDevice"]
