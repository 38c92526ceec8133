"""Run the OpenAI-compatible app with uvicorn inside the caller's event loop.

``HTTPServer`` binds its own socket (port 0 picks a free one, read it back from ``.port``), so
tests and the CLI share one code path; the engine and the server live on the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Collection, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import uvicorn

from sdk.errors import InferenceError
from sdk.inference.http.app import create_app

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling; ``HTTPServer`` installs loop handlers if asked."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HTTPServer:
    """An ASGI app served on ``host:port`` by uvicorn, as an async context manager."""

    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_level: str = "warning",
        handle_signals: bool = False,
    ) -> None:
        self.app = app
        self.host = host
        self._requested_port = port
        self._config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                                      timeout_graceful_shutdown=10)
        self._server = _Server(self._config)
        self._handle_signals = handle_signals
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The bound port (after ``start``)."""
        if self._sock is None:
            raise RuntimeError("server not started")
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        """Base URL of the OpenAI API, e.g. ``http://127.0.0.1:8000/v1``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def start(self) -> None:
        """Bind the socket and start serving; returns once uvicorn accepts connections.

        Raises ``InferenceError`` (reason ``bind_failed``) if the address is taken."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self._requested_port))
        except OSError as exc:
            sock.close()
            log.error("cannot bind %s:%d: %s", self.host, self._requested_port, exc)
            raise InferenceError(f"cannot bind {self.host}:{self._requested_port}: {exc.strerror or exc}",
                                 reason="bind_failed") from exc
        sock.set_inheritable(True)
        self._sock = sock
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="autoglm-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # re-raise the startup failure
                raise RuntimeError("HTTP server exited during startup")
            await asyncio.sleep(0.01)
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self._on_signal, sig)
        log.info("serving the OpenAI API on %s", self.url)

    def _on_signal(self, sig: int) -> None:
        log.info("received %s: draining", signal.Signals(sig).name)
        self._begin_drain()
        if self._server.should_exit:
            self._server.force_exit = True
        self._server.should_exit = True

    def _begin_drain(self) -> None:
        admission = getattr(getattr(self.app, "state", None), "admission", None)
        if admission is not None:
            admission.draining = True

    async def wait(self) -> None:
        """Serve until ``stop()`` or a signal (when ``handle_signals``)."""
        if self._task is not None:
            await self._task

    async def stop(self) -> None:
        """Refuse new requests (503), let in-flight ones finish, then close the socket."""
        self._begin_drain()
        if self._task is not None:
            self._server.should_exit = True
            await self._task
            self._task = None
        if self._sock is not None:
            self._sock.close()
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        log.info("HTTP server stopped")

    async def __aenter__(self) -> HTTPServer:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


#: Environment variable with comma-separated bearer keys, added to the ``--api-key`` flags.
API_KEYS_ENV = "AUTOGLM_API_KEYS"


def api_keys_from(flags: Iterable[str] | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The bearer keys ``/v1`` requires: ``flags`` (``--api-key``, repeatable) then the comma list
    in ``$AUTOGLM_API_KEYS``; blanks dropped, order kept, duplicates removed. Empty: no key needed."""
    env = os.environ if environ is None else environ
    keys = [*(flags or ()), *env.get(API_KEYS_ENV, "").split(",")]
    return tuple(dict.fromkeys(k.strip() for k in keys if k.strip()))


async def serve_backend(
    backend: Any,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str | None = None,
    max_concurrent: int = 64,
    max_queued: int = 256,
    api_keys: Collection[str] | None = None,
    log_level: str = "info",
) -> None:
    """Serve ``backend`` over HTTP until SIGINT/SIGTERM (the ``autoglm serve`` loop)."""
    app = create_app(backend, served_model_name=served_model_name, max_concurrent=max_concurrent,
                     max_queued=max_queued, api_keys=api_keys)
    server = HTTPServer(app, host=host, port=port, log_level=log_level, handle_signals=True)
    await server.start()
    try:
        await server.wait()
    finally:
        await server.stop()


__all__ = ["HTTPServer", "serve_backend", "create_app", "api_keys_from", "API_KEYS_ENV"]
