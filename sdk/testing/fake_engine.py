"""A deterministic stand-in for :class:`sdk.inference.Engine`: the same interface, no torch, no model.

    engine = FakeEngine()                                   # replies "Echo: <prompt>"
    result = await engine.generate(GenerationRequest(prompt="Hi", max_new_tokens=32))
    assert result.text == "Echo: Hi" and result.finish_reason == "stop"

One token is one character (its id is the code point), so prompts, token ids and texts map onto
each other exactly. The reply is ``reply(prompt_text)`` (default :func:`echo`) cut at
``max_new_tokens`` characters (``finish_reason="length"``) or before a ``stop`` string; the last
chunk carries :class:`~sdk.inference.Usage`. A request whose token ids are an earlier prompt plus
the start of its reply (a mesh router resuming on another node) continues that reply. Leaving the stream early, :meth:`FakeEngine.cancel`
or :meth:`FakeEngine.aclose` cancel a request. A request with ``response_format`` (``json_schema``
or ``json_object``) is answered with :func:`minimal_instance` of its schema as compact JSON
(deterministic; ``{}`` for ``json_object``), checked with the real engine's schema bounds. ``features`` (default: all of
``json_object``, ``json_schema``, ``tools``) is what a ``MeshNode`` over it advertises; a request
needing one left out is refused with ``structured_output_unavailable``, as a node without the
grammar library refuses it. ``MeshNode``, ``Mesh`` and the HTTP app accept it wherever they
accept an engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from sdk.inference.detokenizer import StopMatcher
from sdk.inference.errors import EngineClosed, InvalidRequest, PromptTooLong
from sdk.inference.types import GenerationRequest, GenerationResult, TokenChunk, Usage

log = logging.getLogger(__name__)

#: The model name a :class:`FakeEngine` serves unless told otherwise.
FAKE_MODEL = "fake-model"
#: The request features a :class:`FakeEngine` honours unless told otherwise (its advertised ``features``).
FAKE_FEATURES = ("json_object", "json_schema", "tools")
#: Token ids are code points: the vocabulary is every Unicode code point.
VOCAB_SIZE = 0x110000
_ROLE_OPEN, _ROLE_CLOSE, _TURN_END = "<|", "|>", "<|end|>"

Reply = Callable[[str], str]


def echo(prompt: str) -> str:
    """The default reply: ``"Echo: " + prompt``."""
    return f"Echo: {prompt}"


def _constant(text: str) -> Reply:
    def reply(prompt: str) -> str:
        return text

    return reply


_FORMATS = {"date": "1970-01-01", "date-time": "1970-01-01T00:00:00Z", "time": "00:00:00Z",
            "email": "a@example.com", "uri": "https://example.com", "uuid": "00000000-0000-0000-0000-000000000000",
            "ipv4": "127.0.0.1", "hostname": "example.com"}


def _pointer(root: Any, ref: str) -> Any:
    node = root
    for part in ref.lstrip("#").split("/")[1:]:
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _number(schema: Mapping[str, Any], integer: bool) -> int | float:
    """0 moved into the schema's bounds (the low end first), a multiple of ``multipleOf``."""
    num = (int, float)
    low, high = schema.get("minimum"), schema.get("maximum")
    xlow, xhigh = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    top = high if isinstance(high, num) else xhigh if isinstance(xhigh, num) else None
    value: float = 0
    if isinstance(low, num):
        value = max(value, low)
    if isinstance(xlow, num) and value <= xlow:
        value = math.floor(xlow) + 1 if integer else (xlow + top) / 2 if top is not None else xlow + 1
    if isinstance(high, num) and value > high:
        value = high
    if isinstance(xhigh, num) and value >= xhigh:
        value = math.ceil(xhigh) - 1 if integer else (xhigh + (low if isinstance(low, num) else xhigh - 2)) / 2
    step = schema.get("multipleOf")
    if isinstance(step, num) and step > 0:
        value = math.ceil(value / step) * step
    return math.ceil(value) if integer else float(value)


def minimal_instance(schema: Any, root: Any = None, depth: int = 0) -> Any:
    """A small deterministic instance of a JSON Schema: required properties only, ``minItems``
    items, the first ``enum`` / ``const`` / ``anyOf`` / ``oneOf`` branch, numbers at 0 clamped to
    the bounds, strings of ``minLength`` "a"s (a few ``format`` s get a sample; ``pattern`` is not
    followed). Enough for the fake engine's structured replies; not a general generator."""
    root = schema if root is None else root
    if depth > 64 or not isinstance(schema, Mapping):
        return None
    if isinstance(schema.get("$ref"), str):
        return minimal_instance(_pointer(root, schema["$ref"]), root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            return minimal_instance(schema[key][0], root, depth + 1)
    if isinstance(schema.get("allOf"), list):
        merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            if isinstance(part, Mapping):
                merged.update({k: v for k, v in part.items() if k not in ("properties", "required")})
                merged["properties"] = {**merged.get("properties", {}), **part.get("properties", {})}
                merged["required"] = [*merged.get("required", []), *part.get("required", [])]
        return minimal_instance(merged, root, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((t for t in kind if t != "null"), kind[0] if kind else None)
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else None
    if kind == "object":
        props = schema.get("properties") or {}
        return {k: minimal_instance(props.get(k, {}), root, depth + 1) for k in schema.get("required") or ()}
    if kind == "array":
        prefix = schema.get("prefixItems") or []
        count = max(int(schema.get("minItems") or 0), len(prefix) if schema.get("minItems") else 0)
        items = [minimal_instance(p, root, depth + 1) for p in prefix[:count]]
        return items + [minimal_instance(schema.get("items", {}), root, depth + 1)] * (count - len(items))
    if kind == "string":
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return _FORMATS[fmt]
        return "a" * int(schema.get("minLength") or 0)
    if kind in ("integer", "number"):
        return _number(schema, kind == "integer")
    if kind == "boolean":
        return False
    return None


class FakeTokenizer:
    """One character per token (id = code point); a plain-text chat template."""

    eos_token_id: int | None = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``."""
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool = False) -> str:
        """The text of ``ids``."""
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        """``<|role|>content<|end|>`` per message, then ``<|assistant|>``."""
        text = "".join(f"{_ROLE_OPEN}{m['role']}{_ROLE_CLOSE}{m['content']}{_TURN_END}" for m in messages)
        return text + (f"{_ROLE_OPEN}assistant{_ROLE_CLOSE}" if add_generation_prompt else "")


def prompt_text(text: str) -> str:
    """What the reply answers: the last user turn of a chat-templated prompt, else the whole text."""
    marker = f"{_ROLE_OPEN}user{_ROLE_CLOSE}"
    start = text.rfind(marker)
    if start < 0:
        return text
    body = text[start + len(marker):]
    end = body.find(_TURN_END)
    return body if end < 0 else body[:end]


#: Replies recently started, by prompt ids, across engines: a request whose ids are one of these
#: prompts plus the start of its reply is a resumed stream (the mesh router's failover) and
#: continues the reply where the failed node stopped.
_STARTED: OrderedDict[tuple[int, ...], str] = OrderedDict()
_MAX_STARTED = 256


def _remember(ids: list[int], reply: str) -> None:
    _STARTED[tuple(ids)] = reply
    _STARTED.move_to_end(tuple(ids))
    while len(_STARTED) > _MAX_STARTED:
        _STARTED.popitem(last=False)


def _resumed(ids: list[int]) -> str | None:
    """The rest of the reply when ``ids`` = a started prompt + the start of its reply, else None."""
    for prompt, reply in reversed(_STARTED.items()):
        n = len(prompt)
        if len(ids) > n and tuple(ids[:n]) == prompt:
            done = "".join(chr(i) for i in ids[n:])
            if reply.startswith(done):
                return reply[len(done):]
    return None


class FakeEngine:
    """Streams ``reply(prompt)`` one character per chunk; safe to share between asyncio tasks.

    ``token_delay`` (seconds) sleeps before each token (0: a bare yield to the loop), so tests can
    stop or cancel mid-stream; ``first_token_delay`` before the first one. ``requests`` records
    every request streamed, ``cancelled`` the request ids that ended early. ``features``: the
    request features it honours (and a mesh node advertises); others are refused.
    """

    def __init__(self, *, model: str = FAKE_MODEL, reply: Reply | str = echo, token_delay: float = 0.0,
                 first_token_delay: float = 0.0, max_sequence_length: int = 4096, max_batch_size: int = 8,
                 version: str = "1", features: Sequence[str] = FAKE_FEATURES) -> None:
        if max_sequence_length < 2 or max_batch_size < 1:
            raise ValueError("max_sequence_length must be >= 2 and max_batch_size >= 1")
        if token_delay < 0 or first_token_delay < 0:
            raise ValueError("delays must be >= 0")
        self.tokenizer = FakeTokenizer()
        self.features: tuple[str, ...] = tuple(features)
        self.reply: Reply = _constant(reply) if isinstance(reply, str) else reply
        self.token_delay = token_delay
        self.first_token_delay = first_token_delay
        self.max_sequence_length = max_sequence_length
        self.max_batch_size = max_batch_size
        self.requests: list[GenerationRequest] = []
        self.cancelled: list[str] = []
        self.completed = 0
        self._active: dict[str, asyncio.Event] = {}
        self._generated = 0
        self._started = time.monotonic()
        self._closed = False
        self._metadata: dict[str, Any] = {
            "name": model, "version": version, "framework": "fake", "dtype": "none",
            "device": {"type": "cpu", "name": "fake", "count": 1},
            "context_length": max_sequence_length,
            "serving": {"max_batch_size": max_batch_size, "max_sequence_length": max_sequence_length,
                        "continuous_batching": True, "cuda_graphs": False},
        }

    # ------------------------------------------------------------------ the Engine interface
    @property
    def metadata(self) -> dict[str, Any]:
        """The model metadata document a node advertises."""
        return self._metadata

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` ran."""
        return self._closed

    def encode(self, request: GenerationRequest) -> list[int]:
        """The prompt token ids of ``request`` (validated first, as the real engine does)."""
        request.validate()
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            if not all(t < VOCAB_SIZE for t in ids):
                raise InvalidRequest(f"prompt_token_ids must be integers in [0, {VOCAB_SIZE})",
                                     field="prompt_token_ids")
        elif request.messages is not None:
            ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(request.messages))
        else:
            ids = self.tokenizer.encode(request.prompt or "")
        if not ids:
            raise InvalidRequest("the prompt is empty", field="prompt")
        return ids

    def expected(self, request: GenerationRequest | str) -> str:
        """The whole text ``request`` (or a plain prompt) will produce: to assert on."""
        req = GenerationRequest(prompt=request) if isinstance(request, str) else request
        ids = self.encode(req)
        text, _ = self._completion(req, ids)
        return text

    def _completion(self, req: GenerationRequest, ids: list[int]) -> tuple[str, str]:
        """(text, finish reason) before streaming: the reply cut by length and stop strings."""
        reply = _resumed(ids)
        if reply is None:
            from sdk.inference.constraints import constraint_from

            constraint = constraint_from(req.response_format)
            if constraint is not None:
                reply = json.dumps(minimal_instance(constraint.schema), separators=(",", ":"), ensure_ascii=False)
            else:
                reply = self.reply(prompt_text(self.tokenizer.decode(ids)))
            _remember(ids, reply)
        room = min(req.max_new_tokens, self.max_sequence_length - len(ids))
        finish = "stop"
        if len(reply) > room:
            reply, finish = reply[:room], "length"
        if req.stop:
            matcher = StopMatcher(list(req.stop))
            out, stopped = matcher.feed(reply)
            if stopped:
                return out, "stop"
            reply = out + matcher.flush()
        return reply, finish

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Yield one ``TokenChunk`` per character; closing the iterator cancels the request."""
        if self._closed:
            raise EngineClosed("the engine is closed")
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"expected a GenerationRequest, got {type(request).__name__}")
        ids = self.encode(request)
        self._check_features(request)
        if len(ids) >= self.max_sequence_length:
            raise PromptTooLong(f"prompt has {len(ids)} tokens; max_sequence_length {self.max_sequence_length} "
                                "leaves no room for output", prompt_tokens=len(ids),
                                max_sequence_length=self.max_sequence_length)
        text, finish = self._completion(request, ids)
        request_id = request.request_id or uuid.uuid4().hex
        stop = asyncio.Event()
        self._active[request_id] = stop
        self.requests.append(request)
        started = time.monotonic()
        first_at: float | None = None
        sent = 0
        done = False
        try:
            if self.first_token_delay:
                await asyncio.sleep(self.first_token_delay)
            for i, char in enumerate(text):
                if stop.is_set() or self._closed:
                    break
                await asyncio.sleep(self.token_delay if i else 0)
                if stop.is_set() or self._closed:
                    break
                first_at = first_at or time.monotonic()
                sent += 1
                self._generated += 1
                if i == len(text) - 1:
                    done = True
                    yield TokenChunk(text=char, token_ids=[ord(char)], finish_reason=finish,  # type: ignore[arg-type]
                                     usage=self._usage(ids, sent, started, first_at))
                    return
                yield TokenChunk(text=char, token_ids=[ord(char)])
            done = True
            reason = "cancelled" if (stop.is_set() or self._closed) else finish
            yield TokenChunk(text="", token_ids=[], finish_reason=reason,  # type: ignore[arg-type]
                             usage=self._usage(ids, sent, started, first_at))
        finally:
            self._active.pop(request_id, None)
            if not done or stop.is_set():
                self.cancelled.append(request_id)
                log.info("fake engine request %s cancelled after %d tokens", request_id, sent)
            else:
                self.completed += 1

    def _check_features(self, request: GenerationRequest) -> None:
        """``StructuredOutputUnavailable`` for a request needing a feature this engine lacks."""
        from sdk.inference.constraints import StructuredOutputUnavailable

        kind = (request.response_format or {}).get("type")
        missing = [name for name, wanted in ((kind, kind is not None), ("tools", request.tools is not None))
                   if wanted and name not in self.features]
        if missing:
            raise StructuredOutputUnavailable(f"this engine does not honour {', '.join(map(str, missing))}")

    def _usage(self, ids: list[int], sent: int, started: float, first_at: float | None) -> Usage:
        now = time.monotonic()
        ttft = (first_at or now) - started
        decode = now - (first_at or now)
        rate = (sent - 1) / decode if sent > 1 and decode > 0 else 0.0
        return Usage(prompt_tokens=len(ids), completion_tokens=sent, time_to_first_token_s=ttft, tokens_per_s=rate)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run ``request`` to the end and return the whole completion."""
        texts: list[str] = []
        ids: list[int] = []
        last: TokenChunk | None = None
        async for chunk in self.stream(request):
            texts.append(chunk.text)
            ids.extend(chunk.token_ids)
            last = chunk
        assert last is not None and last.finish_reason is not None and last.usage is not None
        return GenerationResult(text="".join(texts), token_ids=ids, finish_reason=last.finish_reason,
                                usage=last.usage)

    def cancel(self, request_id: str) -> bool:
        """End a running request; its stream ends with ``finish_reason="cancelled"``."""
        stop = self._active.get(request_id)
        if stop is None:
            return False
        stop.set()
        return True

    def stats(self) -> dict[str, Any]:
        """Live load figures in the real engine's names."""
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return {"queue_depth": 0, "active_streams": len(self._active), "max_batch_size": self.max_batch_size,
                "tokens_per_s": self._generated / elapsed, "free_cache_tokens": self.max_sequence_length
                * max(self.max_batch_size - len(self._active), 0), "prefix_hit_rate": 0.0,
                "requests": len(self.requests), "completed": self.completed, "cancelled": len(self.cancelled)}

    def close(self) -> None:
        """Stop: running streams end ``cancelled``, new requests raise ``EngineClosed``."""
        self._closed = True

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        self.close()

    async def __aenter__(self) -> FakeEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


__all__ = ["FakeEngine", "FakeTokenizer", "FAKE_MODEL", "FAKE_FEATURES", "VOCAB_SIZE", "echo", "prompt_text"]
