"""Blocking facade over :class:`SecureClient` for scripts and non-asyncio apps.

The client runs on a private event loop in a daemon thread; handlers registered with
:meth:`SyncSecureClient.subscribe` / :meth:`SyncSecureClient.serve` run on that thread.
"""

from __future__ import annotations

from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from sdk.identity import Key
from sdk.messaging.client import SecureClient, Subscription
from sdk.messaging.envelope import Message
from sdk.messaging.loop_thread import LoopThread

T = TypeVar("T")


class SyncSecureClient:
    """``with SyncSecureClient(url, key) as c: c.request(topic, body, timeout=5)``."""

    def __init__(self, broker: Any, key: Key, **options: Any) -> None:
        self._lt = LoopThread("autoglm-sync-client")
        try:
            self.client: SecureClient = self._call(self._make(broker, key, options))
        except BaseException:
            self._stop_loop()
            raise

    @staticmethod
    async def _make(broker: Any, key: Key, options: dict[str, Any]) -> SecureClient:
        client = SecureClient(broker, key, **options)
        await client.connect()
        return client

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return self._lt.call(coro, timeout)

    def publish(self, topic: str, body: Any = None, **kwargs: Any) -> str:
        return self._call(self.client.publish(topic, body, **kwargs))

    def request(self, topic: str, body: Any = None, **kwargs: Any) -> Message:
        return self._call(self.client.request(topic, body, **kwargs))

    def subscribe(self, topic_filter: str, handler: Any, **kwargs: Any) -> Subscription:
        return self._call(self.client.subscribe(topic_filter, handler, **kwargs))

    def serve(self, topic_filter: str, handler: Any, **kwargs: Any) -> Subscription:
        return self._call(self.client.serve(topic_filter, handler, **kwargs))

    def stream(self, topic: str, body: Any = None, **kwargs: Any) -> Iterator[Message]:
        """Iterate the response messages; closing the iterator early sends ``cancel``."""
        stream = self.client.stream(topic, body, **kwargs)
        try:
            while True:
                try:
                    yield self._call(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(stream.aclose())

    @property
    def stats(self) -> Any:
        return self.client.stats

    def close(self) -> None:
        """Disconnect and stop the loop thread."""
        if self._lt.running:
            try:
                self._call(self.client.aclose(), timeout=10)
            finally:
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._lt.stop()

    def __enter__(self) -> SyncSecureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["SyncSecureClient"]
