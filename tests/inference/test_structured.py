"""Constrained decoding on the real SmolLM2 engine: every output validates against its schema
(greedy and sampled), constrained and unconstrained requests share batches, bad schemas get
typed errors, and tool calls work through the OpenAI API of a real ``serve`` app."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from sdk.inference import GenerationRequest, InvalidRequest
from sdk.inference.constraints import (
    MAX_SCHEMA_BYTES,
    MAX_SCHEMA_DEPTH,
    InvalidSchema,
    SchemaTooLarge,
    StructuredOutputUnavailable,
    UnsupportedSchema,
)
from sdk.inference.http import create_app
from tests.inference.http_harness import ServerThread

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "smollm2-structured"

SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {  # required keys, integer bounds, enum, array of bounded strings
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "color": {"enum": ["red", "green", "blue"]},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        },
        "required": ["name", "age", "color", "tags"],
        "additionalProperties": False,
    },
    "nested": {  # objects inside objects inside arrays, numbers and booleans
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer", "minimum": 1, "maximum": 9999},
                    "address": {
                        "type": "object",
                        "properties": {"city": {"type": "string", "maxLength": 20},
                                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                        "required": ["city", "zip"],
                        "additionalProperties": False,
                    },
                },
                "required": ["id", "address"],
                "additionalProperties": False,
            },
            "score": {"type": "number", "minimum": 0, "maximum": 10},
            "active": {"type": "boolean"},
            "items": {
                "type": "array",
                "items": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                                                           "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                          "required": ["sku", "qty"], "additionalProperties": False},
                "minItems": 1, "maxItems": 2,
            },
        },
        "required": ["user", "score", "active", "items"],
        "additionalProperties": False,
    },
    "layout": {  # the coordinator's kind of config: enums, bounded numbers, a $ref'd definition
        "$defs": {"panel": {"type": "object", "properties": {"id": {"enum": ["clock", "media", "map"]},
                                                             "size": {"enum": ["s", "m", "l"]}},
                            "required": ["id", "size"], "additionalProperties": False}},
        "type": "object",
        "properties": {
            "layout": {"enum": ["grid", "list", "carousel"]},
            "font_scale": {"type": "number", "minimum": 0.5, "maximum": 3},
            "columns": {"type": "integer", "minimum": 1, "maximum": 6},
            "panels": {"type": "array", "items": {"$ref": "#/$defs/panel"}, "maxItems": 3},
            "dark_mode": {"type": "boolean"},
        },
        "required": ["layout", "font_scale", "columns", "panels", "dark_mode"],
        "additionalProperties": False,
    },
    "choice": {"enum": ["yes", "no", "maybe"]},  # a bare enum, not an object
    "nullable": {  # type unions and null
        "type": "object",
        "properties": {"note": {"type": ["string", "null"], "maxLength": 16},
                       "count": {"type": ["integer", "null"], "minimum": 0, "maximum": 100}},
        "required": ["note", "count"],
        "additionalProperties": False,
    },
}

PROMPT = [{"role": "user", "content": "Reply with a JSON value for a small example record."}]


def _format(schema: dict[str, Any], *, strict: bool = False) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "record", "schema": schema, "strict": strict}}


def _run(engine: Any, *requests: GenerationRequest) -> list[Any]:
    async def main() -> list[Any]:
        return list(await asyncio.gather(*(engine.generate(r) for r in requests)))

    return asyncio.run(main())


def _check(schema: dict[str, Any], result: Any) -> Any:
    assert result.finish_reason == "stop", (result.finish_reason, result.text)
    value = json.loads(result.text)
    jsonschema.validate(value, schema)
    return value


# ------------------------------------------------------------------ engine


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_output_validates_greedy_and_sampled(smollm2_engine: Any, name: str) -> None:
    schema = SCHEMAS[name]
    requests = [GenerationRequest(messages=PROMPT, max_new_tokens=160, temperature=0.0, response_format=_format(schema))]
    requests += [GenerationRequest(messages=PROMPT, max_new_tokens=160, temperature=1.0, seed=seed,
                                   response_format=_format(schema)) for seed in (1, 2, 3)]
    for result in _run(smollm2_engine, *requests):
        _check(schema, result)


def test_json_object_mode_gives_an_object(smollm2_engine: Any) -> None:
    results = _run(smollm2_engine, *[
        GenerationRequest(messages=PROMPT, max_new_tokens=160, temperature=t, seed=7, response_format={"type": "json_object"})
        for t in (0.0, 1.0)])
    for result in results:
        assert isinstance(_check({"type": "object"}, result), dict)


def test_strict_closes_objects(smollm2_engine: Any) -> None:
    """``strict: true`` gives objects without ``additionalProperties`` a closed key set."""
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}
    closed = {**schema, "additionalProperties": False}
    results = _run(smollm2_engine, *[
        GenerationRequest(messages=PROMPT, max_new_tokens=60, temperature=1.0, seed=s, response_format=_format(schema, strict=True))
        for s in (1, 2)])
    for result in results:
        _check(closed, result)


def test_constrained_and_unconstrained_share_a_batch(smollm2_engine: Any) -> None:
    schema = SCHEMAS["person"]
    free = GenerationRequest(prompt="The capital of France is", max_new_tokens=12, temperature=0.0)
    alone = _run(smollm2_engine, free)[0]
    mixed = _run(smollm2_engine,
                 GenerationRequest(messages=PROMPT, max_new_tokens=160, temperature=0.0, response_format=_format(schema)),
                 free,
                 GenerationRequest(messages=PROMPT, max_new_tokens=160, temperature=1.0, seed=5,
                                   response_format=_format(SCHEMAS["layout"])),
                 GenerationRequest(messages=PROMPT, max_new_tokens=20, temperature=1.0, seed=5))
    _check(schema, mixed[0])
    _check(SCHEMAS["layout"], mixed[2])
    assert mixed[1].finish_reason == "length" and "Paris" in mixed[1].text
    assert mixed[1].token_ids == alone.token_ids  # greedy rows are untouched by the masked ones
    assert mixed[3].finish_reason in ("length", "stop") and len(mixed[3].token_ids) <= 20


def test_compiled_grammars_are_cached(smollm2_engine: Any) -> None:
    schema = {"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"], "additionalProperties": False}
    first = _run(smollm2_engine, GenerationRequest(messages=PROMPT, max_new_tokens=20, temperature=0.0,
                                                   response_format=_format(schema)))[0]
    compiler = asyncio.run(smollm2_engine.grammar_compiler())
    compiles, hits = compiler.compiles, compiler.hits
    reordered = {"additionalProperties": False, "required": ["k"], "properties": {"k": {"enum": ["x", "y"]}}, "type": "object"}
    again = _run(smollm2_engine, GenerationRequest(messages=PROMPT, max_new_tokens=20, temperature=0.0,
                                                   response_format=_format(reordered)))[0]
    assert (compiler.compiles, compiler.hits) == (compiles, hits + 1)  # same canonical schema: no compile
    assert again.text == first.text


def test_resumed_generation_keeps_the_grammar(smollm2_engine: Any) -> None:
    """A mesh resume: prompt + the first output tokens, ``generated_prefix`` of them, finishes valid."""
    schema = SCHEMAS["person"]
    whole = _run(smollm2_engine, GenerationRequest(messages=PROMPT, max_new_tokens=160, temperature=0.0,
                                                   response_format=_format(schema)))[0]
    prompt_ids = smollm2_engine.encode(GenerationRequest(messages=PROMPT))
    k = len(whole.token_ids) // 2
    rest = _run(smollm2_engine, GenerationRequest(prompt_token_ids=prompt_ids + whole.token_ids[:k], generated_prefix=k,
                                                  max_new_tokens=160, temperature=0.0, response_format=_format(schema)))[0]
    assert whole.token_ids[:k] + rest.token_ids == whole.token_ids
    bad = smollm2_engine.tokenizer("Hello", add_special_tokens=False)["input_ids"][:1]
    with pytest.raises(InvalidRequest) as info:  # the prefix is not the start of a valid output
        _run(smollm2_engine, GenerationRequest(prompt_token_ids=prompt_ids + bad, generated_prefix=1,
                                               max_new_tokens=8, response_format=_format(schema)))
    assert info.value.field == "generated_prefix"


@pytest.mark.parametrize(
    ("response_format", "error", "reason"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}, InvalidSchema, "invalid_schema"),
        (_format({"type": "string", "pattern": "(("}), InvalidSchema, "invalid_schema"),
        (_format({"type": "object", "if": {"type": "string"}}), UnsupportedSchema, "unsupported_schema"),
        (_format({"$ref": "https://example.com/schema.json"}), UnsupportedSchema, "unsupported_schema"),
        (_format({"$ref": "#/$defs/missing"}), InvalidSchema, "invalid_schema"),
        ({"type": "xml"}, UnsupportedSchema, "unsupported_schema"),
        ({"type": "json_schema"}, InvalidSchema, "invalid_schema"),
        ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, InvalidSchema, "invalid_schema"),
    ],
)
def test_bad_schemas_get_typed_errors(smollm2_engine: Any, response_format: dict[str, Any], error: type[Exception],
                                      reason: str) -> None:
    with pytest.raises(error) as info:
        _run(smollm2_engine, GenerationRequest(messages=PROMPT, max_new_tokens=8, response_format=response_format))
    assert info.value.reason == reason  # type: ignore[attr-defined]
    ok = _run(smollm2_engine, GenerationRequest(prompt="Hi", max_new_tokens=2, temperature=0.0))[0]
    assert ok.finish_reason == "length"  # the engine keeps serving


def test_schema_bounds_are_checked_before_compiling(smollm2_engine: Any) -> None:
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH):
        deep = {"type": "object", "properties": {"a": deep}}
    wide = {"type": "object", "properties": {f"k{i}": {"type": "string", "description": "x" * 64}
                                             for i in range(MAX_SCHEMA_BYTES // 64)}}
    compiler = asyncio.run(smollm2_engine.grammar_compiler())
    compiles = compiler.compiles
    for schema in (deep, wide):
        with pytest.raises(SchemaTooLarge) as info:
            GenerationRequest(messages=PROMPT, response_format=_format(schema)).validate()
        assert info.value.reason == "schema_too_large"
        with pytest.raises(SchemaTooLarge):
            _run(smollm2_engine, GenerationRequest(messages=PROMPT, max_new_tokens=4, response_format=_format(schema)))
    assert compiler.compiles == compiles


def test_no_grammar_library_is_a_typed_error_not_free_text(make_engine: Callable[..., Any],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(max_batch_size=1)
    monkeypatch.setitem(__import__("sys").modules, "llguidance", None)  # as if not installed
    with pytest.raises(StructuredOutputUnavailable) as info:
        _run(engine, GenerationRequest(messages=PROMPT, max_new_tokens=8, response_format=_format(SCHEMAS["choice"])))
    assert info.value.reason == "structured_output_unavailable"


# ------------------------------------------------------------------ HTTP: response_format and tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def srv(smollm2_engine: Any) -> Iterator[ServerThread]:
    with ServerThread(create_app(smollm2_engine, served_model_name=MODEL)) as server:
        yield server


@pytest.fixture(scope="module")
def client(srv: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=srv.api_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def _arguments_valid(call: Any) -> None:
    tool = next(t for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_http_response_format_json_schema(client: openai.OpenAI) -> None:
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=160, temperature=temperature, seed=3,
                                           response_format=_format(SCHEMAS["layout"]))  # type: ignore[arg-type]
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), SCHEMAS["layout"])
    r = client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=160, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    done = client.completions.create(model=MODEL, prompt="A record as JSON:", max_tokens=160, temperature=0,
                                     extra_body={"response_format": _format(SCHEMAS["choice"])})
    assert done.choices[0].finish_reason == "stop" and json.loads(done.choices[0].text) in ("yes", "no", "maybe")


def test_http_bad_schema_is_400_with_reason(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4,
                                       response_format=_format({"type": "object", "if": {}}))  # type: ignore[arg-type]
    assert info.value.body["code"] == "unsupported_schema"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=PROMPT, max_tokens=4, tools=[WEATHER],  # type: ignore[list-item]
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.body["param"] == "tool_choice"  # type: ignore[index]


@pytest.mark.parametrize("stream", [False, True])
def test_http_required_tool_call(client: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120,
                                  temperature=0)
    if not stream:
        r = client.chat.completions.create(**kwargs)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls or []
    else:
        deltas, finish = [], None
        for chunk in client.chat.completions.create(stream=True, **kwargs):
            if chunk.choices and chunk.choices[0].delta.tool_calls:
                deltas.extend(chunk.choices[0].delta.tool_calls)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        assert finish == "tool_calls" and len(deltas) == 1
        calls = deltas  # type: ignore[assignment]
    assert len(calls) == 1 and calls[0].type == "function" and calls[0].id
    _arguments_valid(calls[0])


def test_http_named_tool_call(client: openai.OpenAI) -> None:
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=120, temperature=temperature,
                                           seed=11, tool_choice={"type": "function", "function": {"name": "get_time"}})
        call = (r.choices[0].message.tool_calls or [None])[0]
        assert call is not None and call.function.name == "get_time"  # type: ignore[union-attr]
        _arguments_valid(call)


def test_http_tool_choice_none_and_auto_answer_text(client: openai.OpenAI, srv: ServerThread) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=8, temperature=0)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    # "auto": the tools are in the prompt; an answer that is not a call stays content
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}], tools=TOOLS,
                                       max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("tool_calls", "length", "stop")
    if choice.finish_reason == "tool_calls":
        _arguments_valid((choice.message.tool_calls or [])[0])
    else:
        assert choice.message.content
    # the conversation can carry the call and its result back
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "tools": TOOLS, "messages": [
        *ASK, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"}]}
    assert httpx.post(f"{srv.api_url}/chat/completions", json=body, timeout=60).status_code == 200


def test_bitmask_applies_bit_for_bit() -> None:
    import torch

    from sdk.inference.sampling import apply_token_bitmask

    gen = torch.Generator().manual_seed(0)
    for vocab, words in ((70, 3), (64, 2), (100, 2)):  # a mask shorter than the vocabulary blocks the rest
        logits = torch.randn(3, vocab, generator=gen)
        mask = torch.randint(-(1 << 31), (1 << 31) - 1, (3, words), dtype=torch.int32, generator=gen)
        out = apply_token_bitmask(logits, mask)
        for r in range(3):
            for t in range(vocab):
                allowed = t < 32 * words and (int(mask[r, t // 32]) >> (t % 32)) & 1
                assert (out[r, t] == logits[r, t]) if allowed else out[r, t] == float("-inf")
