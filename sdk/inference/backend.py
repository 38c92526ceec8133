"""The contract between the OpenAI-compatible HTTP front end and whatever generates tokens.

A local :class:`~sdk.inference.engine.Engine` and the mesh router both serve the same HTTP API by
satisfying :class:`GenerationBackend`. An engine exposes ``metadata`` instead of ``models()``;
:func:`as_backend` adapts it. This module imports neither torch nor the web stack.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class GenerationBackend(Protocol):
    """Something that turns a ``GenerationRequest`` into tokens, for one or more models."""

    def stream(self, req: Any, /) -> AsyncIterator[Any]:
        """Yield ``TokenChunk``s; the last carries ``finish_reason`` and ``usage``."""
        ...

    async def generate(self, req: Any, /) -> Any:
        """Return a whole ``GenerationResult``."""
        ...

    def models(self) -> list[dict[str, Any]]:
        """The model metadata documents this backend serves (each has a ``name``)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Live load figures (queue depth, active streams, tokens/s...), numbers where possible."""
        ...


class EngineBackend:
    """Adapts an object with ``stream``/``generate``/``stats``/``metadata`` (the engine)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def stream(self, req: Any, /) -> AsyncIterator[Any]:
        """Delegate to the engine's token stream."""
        return self.engine.stream(req)

    async def generate(self, req: Any, /) -> Any:
        """Delegate to the engine's whole-result generation."""
        return await self.engine.generate(req)

    def models(self) -> list[dict[str, Any]]:
        """The engine's single metadata document."""
        return [dict(self.engine.metadata)]

    def stats(self) -> dict[str, Any]:
        """The engine's live statistics."""
        return dict(self.engine.stats())


def as_backend(obj: Any) -> GenerationBackend:
    """Return ``obj`` if it is already a backend, else wrap an engine-like object."""
    if callable(getattr(obj, "models", None)):
        return obj  # type: ignore[no-any-return]
    for attr in ("stream", "generate", "stats", "metadata"):
        if not hasattr(obj, attr):
            raise TypeError(f"{type(obj).__name__} is not a generation backend (missing {attr!r})")
    return EngineBackend(obj)


__all__ = ["GenerationBackend", "EngineBackend", "as_backend"]
