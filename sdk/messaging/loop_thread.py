"""An asyncio event loop on a private daemon thread: the base of the blocking facades.

``SyncSecureClient`` and ``SyncDevice`` run their asyncio object on one of these and call it
with :meth:`LoopThread.call`; handlers registered through them run on that thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """``lt = LoopThread("name"); lt.call(coro, timeout); lt.stop()``."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self.loop.is_running()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result (re-raising its exception)."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("LoopThread.call() from the loop's own thread would deadlock")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, join_timeout: float = 5.0) -> None:
        """Stop the loop, join the thread and close the loop (idempotent)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(join_timeout)
        if not self._thread.is_alive():
            self.loop.close()


__all__ = ["LoopThread"]
