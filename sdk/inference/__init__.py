"""The shared inference core: a torch + transformers engine with continuous batching and streaming.

Types and errors import without torch; ``Engine`` (and the torch-backed modules) load on first use,
so a router-only peer can import ``sdk.inference`` types without torch installed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    EngineClosed,
    EngineOverloaded,
    InferenceError,
    InvalidConfig,
    InvalidRequest,
    PromptTooLong,
)
from .types import EngineConfig, FinishReason, GenerationRequest, GenerationResult, TokenChunk, Usage

if TYPE_CHECKING:
    from .engine import Engine

_LAZY = {"Engine": ".engine"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Engine",
    "EngineConfig",
    "GenerationRequest",
    "GenerationResult",
    "TokenChunk",
    "Usage",
    "FinishReason",
    "InferenceError",
    "InvalidRequest",
    "InvalidConfig",
    "PromptTooLong",
    "EngineOverloaded",
    "EngineClosed",
]
