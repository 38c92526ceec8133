"""Run an HTTP app in-process on a free port, in a thread with its own event loop.

Sync tests then drive it with real clients (``openai.OpenAI``, ``httpx``); the engine is shared
across loops (each request carries its own loop).
"""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType
from typing import Any

from sdk.inference.server import HTTPServer


class ServerThread:
    """``with ServerThread(app) as srv:`` serves ``app`` on 127.0.0.1:<free port> until exit."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="http-test-server", daemon=True)
        self.server = HTTPServer(app, host="127.0.0.1", port=0)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def api_url(self) -> str:
        """The OpenAI base URL (``.../v1``)."""
        return self.server.url

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        """Run ``coro`` on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.call(self.server.start())
        return self

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.call(self.server.stop(), timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
