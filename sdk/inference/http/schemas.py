"""OpenAI request bodies (pydantic) for ``/v1/completions`` and ``/v1/chat/completions``.

Unknown fields are ignored, as vLLM does; fields we cannot honour (``n > 1``, ``logprobs``,
penalties...) are rejected with a clear 400 by :func:`unsupported`. ``response_format``,
``tools`` and ``tool_choice`` are checked by ``GenerationRequest.validate`` and
:mod:`sdk.inference.http.tool_calls`.
"""

from __future__ import annotations

import json
from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 16


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` has an effect."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class SamplingBody(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)  # extension (vLLM, Ollama); 0/None = off
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are supported")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    def stop_list(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionBody(SamplingBody):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int]
    echo: bool = False
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None

    def prompt_text(self) -> str | list[int]:
        """The single prompt (text or token ids); batches of prompts are rejected earlier."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        first = prompt[0] if prompt else None
        if isinstance(first, str):
            return first
        return cast(list[int], prompt)  # pydantic picked list[int]: the items are ints


class ContentPart(BaseModel):
    """One part of a multi-part message; only text parts are supported."""

    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None


class ChatCompletionBody(SamplingBody):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None  # accepted; a reply holds at most one call


def unsupported(body: SamplingBody) -> tuple[str, str] | None:
    """Return ``(param, message)`` for the first requested feature we cannot honour."""
    if body.n != 1:
        return "n", "only n=1 is supported"
    if body.presence_penalty or body.frequency_penalty:
        param = "presence_penalty" if body.presence_penalty else "frequency_penalty"
        return param, f"{param} is not supported (use 0)"
    if body.logit_bias:
        return "logit_bias", "logit_bias is not supported"
    if isinstance(body, CompletionBody):
        if body.logprobs is not None:
            return "logprobs", "logprobs are not supported"
        if body.echo:
            return "echo", "echo is not supported"
        if body.suffix:
            return "suffix", "suffix is not supported"
        if body.best_of not in (None, 1):
            return "best_of", "only best_of=1 is supported"
        if (
            isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str)
            and len(body.prompt) != 1
        ):
            return "prompt", "only one prompt per request is supported"
        if isinstance(body.prompt, list) and not body.prompt:
            return "prompt", "prompt must not be empty"
    if isinstance(body, ChatCompletionBody):
        if body.logprobs or body.top_logprobs:
            return "logprobs", "logprobs are not supported"
        for i, msg in enumerate(body.messages):
            if isinstance(msg.content, list) and any(p.type != "text" for p in msg.content):
                return f"messages[{i}].content", "only text content parts are supported"
    return None


def _call_text(call: dict[str, Any]) -> str:
    """An earlier assistant tool call as the model writes one (``<tool_call>{...}</tool_call>``)."""
    fn = call.get("function")
    fn = fn if isinstance(fn, dict) else {}
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except ValueError:
        pass
    return "<tool_call>" + json.dumps({"name": fn.get("name"), "arguments": args}, ensure_ascii=False) + "</tool_call>"


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as ``{"role", "content"}`` dicts for the chat template (parts joined; earlier
    tool calls written out as the model writes them)."""
    out = []
    for msg in messages:
        if isinstance(msg.content, list):
            content = "".join(p.text or "" for p in msg.content)
        else:
            content = msg.content or ""
        if msg.tool_calls:
            content += "".join(_call_text(c) for c in msg.tool_calls if isinstance(c, dict))
        role = "system" if msg.role == "developer" else msg.role
        out.append({"role": role, "content": content})
    return out


__all__ = [
    "StreamOptions",
    "SamplingBody",
    "CompletionBody",
    "ChatMessage",
    "ChatCompletionBody",
    "unsupported",
    "message_dicts",
]
