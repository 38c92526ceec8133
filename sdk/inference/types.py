"""Request, result and configuration types of the inference engine (plain dataclasses, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class EngineConfig:
    """How to load the model and size the engine.

    ``max_sequence_length`` bounds prompt + output of one request. ``kv_cache_tokens`` (None: from
    ``gpu_memory_utilization`` on CUDA, ``max_batch_size * max_sequence_length`` on CPU) bounds the
    slots' KV cache; ``max_queue_size`` bounds requests waiting for a slot (then ``EngineOverloaded``).
    """

    model_path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    max_sequence_length: int = 8192
    max_batch_size: int = 8
    max_queue_size: int = 256
    kv_cache_tokens: int | None = None
    prefill_chunk_size: int = 512
    prefix_cache_tokens: int = 8192
    cuda_graphs: bool = False
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.max_sequence_length < 2:
            raise ValueError("max_sequence_length must be at least 2")
        if self.max_batch_size < 1 or self.max_queue_size < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue_size >= 0")
        if self.prefill_chunk_size < 1 or self.prefix_cache_tokens < 0:
            raise ValueError("prefill_chunk_size must be >= 1 and prefix_cache_tokens >= 0")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: exactly one of ``prompt``, ``messages`` (chat template) or ``prompt_token_ids``.

    ``temperature`` 0 means greedy. ``top_k`` 0 and ``top_p`` 1.0 disable those filters. ``stop``
    strings end the output before the match (the match is not emitted).
    """

    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    prompt_token_ids: list[int] | None = None
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: list[str] | tuple[str, ...] = ()
    seed: int | None = None
    request_id: str | None = None
    model: str | None = None  # the model asked for: the mesh router routes on it; an engine ignores it


@dataclass(frozen=True)
class Usage:
    """Token counts and timings of one finished request.

    ``tokens_per_s`` is the decode rate after the first token; ``cached_prompt_tokens`` the prompt
    tokens whose KV came from the prefix cache.
    """

    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    tokens_per_s: float
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenChunk:
    """One step of a stream: the new token ids and the text they complete (may be "" while held back).

    The last chunk has ``finish_reason`` and ``usage`` set.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class GenerationResult:
    """A whole completion: the concatenated chunk texts and all generated token ids."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage


__all__ = ["EngineConfig", "GenerationRequest", "TokenChunk", "GenerationResult", "Usage", "FinishReason"]
