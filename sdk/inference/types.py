"""Request, result and configuration types of the inference engine (plain dataclasses, no torch)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import InvalidRequest

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled"]

#: Bounds :meth:`GenerationRequest.validate` enforces (an engine's ``max_sequence_length`` is
#: usually the tighter limit on tokens; these bound the work done before it is known).
MAX_PROMPT_CHARS = 4 * 1024 * 1024
MAX_PROMPT_TOKENS = 1 << 20
MAX_MESSAGES = 4096
MAX_NEW_TOKENS = 1 << 20
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512
MAX_NAME_CHARS = 256  # request_id, model, message role
_SEED_RANGE = (-(1 << 63), (1 << 64) - 1)  # what torch.Generator.manual_seed accepts


#: Values of ``EngineConfig.runtime`` / ``--runtime``.
RUNTIME_CHOICES = ("auto", "transformers", "native")


@dataclass(frozen=True)
class EngineConfig:
    """How to load the model and size the engine.

    ``max_sequence_length`` bounds prompt + output of one request (None: the model's context
    length, at most 8192; above the model's context is ``InvalidConfig``). The KV cache is paged
    (blocks of ``kv_block_size`` tokens) and grows with the load up to a budget: ``kv_memory``
    bytes, else ``kv_cache_tokens`` tokens, else on CUDA what ``gpu_memory_utilization`` leaves,
    on CPU ``max_batch_size * max_sequence_length`` tokens (at most a quarter of RAM). After
    ``kv_idle_shrink_s`` seconds idle it shrinks back to the prefix cache (``prefix_cache_tokens``).
    ``max_batch_size`` sequences run at once; ``max_queue_size`` bounds requests waiting to be
    admitted (then ``EngineOverloaded``).
    """

    model_path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    gpu_memory_utilization: float = 0.9
    max_sequence_length: int | None = None
    max_batch_size: int = 8
    max_queue_size: int = 256
    kv_cache_tokens: int | None = None
    prefill_chunk_size: int = 512
    prefix_cache_tokens: int = 8192
    cuda_graphs: bool = False
    warmup: bool = True
    kv_memory: int | None = None
    kv_block_size: int = 16
    kv_idle_shrink_s: float = 2.0
    #: ``auto`` (default), ``transformers`` or ``native`` (sdk.inference.native_llama, Llama models);
    #: ``auto`` = native on CPU for a supported Llama config, transformers otherwise.
    runtime: str = "auto"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIME_CHOICES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIME_CHOICES)}")
        if self.max_sequence_length is not None and self.max_sequence_length < 2:
            raise ValueError("max_sequence_length must be at least 2")
        if self.max_batch_size < 1 or self.max_queue_size < 0:
            raise ValueError("max_batch_size must be >= 1 and max_queue_size >= 0")
        if self.prefill_chunk_size < 1 or self.prefix_cache_tokens < 0:
            raise ValueError("prefill_chunk_size must be >= 1 and prefix_cache_tokens >= 0")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if (self.kv_memory is not None and self.kv_memory <= 0) or not 1 <= self.kv_block_size <= 1024:
            raise ValueError("kv_memory must be positive and kv_block_size in [1, 1024]")
        if not self.kv_idle_shrink_s >= 0:
            raise ValueError("kv_idle_shrink_s must be >= 0")


@dataclass(frozen=True)
class GenerationRequest:
    """One generation: exactly one of ``prompt``, ``messages`` (chat template) or ``prompt_token_ids``.

    ``temperature`` 0 means greedy. ``top_k`` 0 and ``top_p`` 1.0 disable those filters. ``stop``
    strings end the output before the match (the match is not emitted).

    ``response_format`` (OpenAI's: ``{"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}`` or ``{"type": "json_object"}``) constrains the output to the schema; the
    sequence ends (``"stop"``) when the value is complete. ``tools`` (OpenAI function tools) are
    shown to the model through the chat template (``messages`` only). ``generated_prefix`` is how
    many trailing ``prompt_token_ids`` are output already generated under ``response_format``
    (a resumed generation): the grammar is advanced over them first.
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
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    generated_prefix: int = 0

    def validate(self) -> GenerationRequest:
        """Check every field (types, ranges, finite numbers, lengths); return ``self``.

        The one place requests are checked: the engine, the HTTP app and the mesh call it before
        any work. Raises :class:`~sdk.inference.errors.InvalidRequest` (reason ``invalid_request``,
        ``field`` naming the offending field). Checks needing the model (vocabulary size, prompt
        length in tokens) are the engine's.
        """
        try:
            _check_request(self)
        except InvalidRequest as exc:
            log.info("invalid generation request (%s): %s", exc.field or "request", exc)
            raise
        return self


def _check_request(r: GenerationRequest) -> None:
    """Raise :class:`InvalidRequest` for the first field of ``r`` that is out of bounds."""
    prompts = (("prompt", r.prompt), ("messages", r.messages), ("prompt_token_ids", r.prompt_token_ids))
    given = [name for name, value in prompts if value is not None]
    if len(given) != 1:
        raise InvalidRequest("give exactly one of prompt, messages or prompt_token_ids",
                             field=given[-1] if given else None)
    if r.prompt is not None:
        _check_prompt(r.prompt)
    elif r.messages is not None:
        _check_messages(r.messages)
    else:
        _check_token_ids(r.prompt_token_ids)
    _check_int("max_new_tokens", r.max_new_tokens, 1, MAX_NEW_TOKENS)
    _check_float("temperature", r.temperature, 0.0, MAX_TEMPERATURE)
    if not _in_range(r.top_p, 0.0, 1.0, open_low=True):
        raise InvalidRequest("top_p must be a number in (0, 1]", field="top_p")
    _check_int("top_k", r.top_k, 0, MAX_TOP_K)
    _check_stop(r.stop)
    if r.seed is not None:
        _check_int("seed", r.seed, *_SEED_RANGE)
    _check_name("request_id", r.request_id)
    _check_name("model", r.model)
    _check_constraint(r)


def _check_constraint(r: GenerationRequest) -> None:
    from .constraints import check_response_format, check_tools  # plain Python, no grammar library

    check_response_format(r.response_format)
    check_tools(r.tools)
    if r.tools is not None and r.messages is None:
        raise InvalidRequest("tools need messages (they are shown through the chat template)", field="tools")
    if r.generated_prefix:
        _check_int("generated_prefix", r.generated_prefix, 0, MAX_PROMPT_TOKENS)
        if r.response_format is None or r.prompt_token_ids is None or r.generated_prefix >= len(r.prompt_token_ids):
            raise InvalidRequest("generated_prefix needs response_format and prompt_token_ids longer than it",
                                 field="generated_prefix")


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be an integer in [{low}, {high}]", field=name)


def _in_range(value: object, low: float, high: float, *, open_low: bool = False) -> bool:
    """``value`` is a finite real number (not a bool) in ``[low, high]`` (``(low, high]``)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    return (low < value if open_low else low <= value) and value <= high


def _check_float(name: str, value: object, low: float, high: float) -> None:
    if not _in_range(value, low, high):
        raise InvalidRequest(f"{name} must be a finite number in [{low}, {high}]", field=name)


def _check_prompt(prompt: object) -> None:
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string", field="prompt")
    if not prompt:
        raise InvalidRequest("the prompt is empty", field="prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"prompt is over {MAX_PROMPT_CHARS} characters", field="prompt")


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list", field="messages")
    if len(messages) > MAX_MESSAGES:
        raise InvalidRequest(f"at most {MAX_MESSAGES} messages", field="messages")
    total = 0
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not all(isinstance(k, str) for k in message):
            raise InvalidRequest(f"messages[{i}] must be a {{role, content}} object", field="messages")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not 0 < len(role) <= MAX_NAME_CHARS:
            raise InvalidRequest(f"messages[{i}].role must be a non-empty string", field="messages")
        if not isinstance(content, str):
            raise InvalidRequest(f"messages[{i}].content must be a string", field="messages")
        total += len(content)
    if total > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"messages hold over {MAX_PROMPT_CHARS} characters", field="messages")


def _check_token_ids(ids: object) -> None:
    name = "prompt_token_ids"
    if not isinstance(ids, list | tuple) or not ids:
        raise InvalidRequest(f"{name} must be a non-empty list of integers", field=name)
    if len(ids) > MAX_PROMPT_TOKENS:
        raise InvalidRequest(f"{name} has over {MAX_PROMPT_TOKENS} ids", field=name)
    if not all(type(t) is int and t >= 0 for t in ids):
        raise InvalidRequest(f"{name} must be non-negative integers", field=name)


def _check_stop(stop: object) -> None:
    if (
        not isinstance(stop, list | tuple)
        or len(stop) > MAX_STOP_STRINGS
        or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop)
    ):
        raise InvalidRequest(
            f"stop must be a list of at most {MAX_STOP_STRINGS} non-empty strings of at most "
            f"{MAX_STOP_CHARS} characters",
            field="stop",
        )


def _check_name(name: str, value: object) -> None:
    if value is not None and (not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS):
        raise InvalidRequest(f"{name} must be a non-empty string of at most {MAX_NAME_CHARS} characters",
                             field=name)


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


__all__ = [
    "EngineConfig",
    "GenerationRequest",
    "TokenChunk",
    "GenerationResult",
    "Usage",
    "FinishReason",
    "MAX_PROMPT_CHARS",
    "MAX_PROMPT_TOKENS",
    "MAX_MESSAGES",
    "MAX_NEW_TOKENS",
    "MAX_TEMPERATURE",
    "MAX_TOP_K",
    "MAX_STOP_STRINGS",
    "MAX_STOP_CHARS",
    "MAX_NAME_CHARS",
]
