"""Server-sent events in the exact framing OpenAI clients parse: ``data: <json>\\n\\n``, then ``[DONE]``."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"


def event(payload: dict[str, Any]) -> bytes:
    """One SSE ``data:`` event carrying a JSON object."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class SSEResponse(StreamingResponse):
    """A ``text/event-stream`` response that always runs ``on_close`` (even if never started).

    Starlette cancels the body when the client disconnects; ``on_close`` then frees the
    generation slot and closes the backend's stream, which cancels the generation.
    """

    media_type = "text/event-stream"

    def __init__(self, content: Any, *, on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            await self._on_close()


__all__ = ["DONE", "event", "SSEResponse"]
