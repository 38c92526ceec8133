"""The contract between the OpenAI-compatible HTTP front end and whatever generates tokens.

A local :class:`~sdk.inference.engine.Engine` and the mesh router both serve the same HTTP API by
satisfying :class:`GenerationBackend`. An engine exposes ``metadata`` instead of ``models()``;
:func:`as_backend` adapts it. This module imports neither torch nor the web stack.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

from .types import GenerationRequest, GenerationResult, TokenChunk

log = logging.getLogger(__name__)

#: A model metadata document (JSON object; see ``sdk.inference.metadata``), with at least ``name``.
ModelDocument = Mapping[str, object]
#: Live load figures: names to numbers where possible (queue depth, active streams, tokens/s...).
BackendStats = Mapping[str, object]


@runtime_checkable
class GenerationBackend(Protocol):
    """Something that turns a ``GenerationRequest`` into tokens, for one or more models."""

    def stream(self, req: GenerationRequest, /) -> AsyncIterator[TokenChunk]:
        """Yield ``TokenChunk``s; the last carries ``finish_reason`` and ``usage``."""
        ...

    async def generate(self, req: GenerationRequest, /) -> GenerationResult:
        """Return a whole ``GenerationResult``."""
        ...

    def models(self) -> Sequence[ModelDocument]:
        """The model metadata documents this backend serves (each has a ``name``)."""
        ...

    def stats(self) -> BackendStats:
        """Live load figures (queue depth, active streams, tokens/s...), numbers where possible."""
        ...


class EngineLike(Protocol):
    """What :class:`EngineBackend` needs of an engine: one model's metadata instead of ``models()``."""

    def stream(self, req: GenerationRequest, /) -> AsyncIterator[TokenChunk]:
        """Yield the request's ``TokenChunk``s."""
        ...

    async def generate(self, req: GenerationRequest, /) -> GenerationResult:
        """Return the whole result."""
        ...

    def stats(self) -> BackendStats:
        """Live load figures."""
        ...

    @property
    def metadata(self) -> ModelDocument:
        """The served model's metadata document."""
        ...


class EngineBackend:
    """Adapts an object with ``stream``/``generate``/``stats``/``metadata`` (the engine)."""

    def __init__(self, engine: EngineLike) -> None:
        self.engine = engine

    def stream(self, req: GenerationRequest, /) -> AsyncIterator[TokenChunk]:
        """Delegate to the engine's token stream."""
        return self.engine.stream(req)

    async def generate(self, req: GenerationRequest, /) -> GenerationResult:
        """Delegate to the engine's whole-result generation."""
        return await self.engine.generate(req)

    def models(self) -> list[dict[str, object]]:
        """The engine's single metadata document."""
        return [dict(self.engine.metadata)]

    def stats(self) -> dict[str, object]:
        """The engine's live statistics."""
        return dict(self.engine.stats())


def as_backend(obj: GenerationBackend | EngineLike) -> GenerationBackend:
    """Return ``obj`` if it is already a backend, else wrap an engine-like object."""
    if isinstance(obj, GenerationBackend):
        return obj
    for attr in ("stream", "generate", "stats", "metadata"):
        if not hasattr(obj, attr):
            raise TypeError(f"{type(obj).__name__} is not a generation backend (missing {attr!r})")
    return EngineBackend(obj)


__all__ = [
    "GenerationBackend",
    "EngineLike",
    "EngineBackend",
    "ModelDocument",
    "BackendStats",
    "as_backend",
]
