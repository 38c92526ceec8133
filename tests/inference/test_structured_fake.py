"""Structured output without a model: the fake engine's minimal instances validate, the schema
bounds and tool plans are the real engine's, and tool-call text is read back as OpenAI calls."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest

from sdk.inference import GenerationRequest
from sdk.inference.constraints import SchemaTooLarge, UnsupportedSchema, constraint_from
from sdk.inference.http import create_app
from sdk.inference.http.tool_calls import ToolCallHold, plan_tools
from sdk.inference.server import HTTPServer
from sdk.inference.tools import parse_tool_call, render_chat, tool_call_schema
from sdk.testing.fake_engine import FakeEngine, FakeTokenizer, minimal_instance

EXTRA = {
    "formats": {"type": "object", "properties": {"d": {"type": "string", "format": "date"},
                                                 "e": {"type": "string", "format": "email"},
                                                 "s": {"type": "string", "minLength": 3}},
                "required": ["d", "e", "s"]},
    "bounds": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 5},
                                                "b": {"type": "number", "exclusiveMinimum": 1, "maximum": 2},
                                                "c": {"type": "integer", "maximum": -3},
                                                "m": {"type": "integer", "minimum": 7, "multipleOf": 5},
                                                "arr": {"type": "array", "items": {"const": 1}, "minItems": 2}},
               "required": ["a", "b", "c", "m", "arr"]},
    "allof": {"allOf": [{"type": "object", "properties": {"x": {"type": "boolean"}}, "required": ["x"]},
                        {"properties": {"y": {"type": "null"}}, "required": ["y"]}]},
}


def _schemas() -> dict[str, dict[str, Any]]:
    from tests.inference.test_structured import SCHEMAS

    return {**SCHEMAS, **EXTRA}


@pytest.mark.parametrize("name", sorted(["person", "nested", "layout", "choice", "nullable", *EXTRA]))
async def test_fake_engine_answers_a_valid_minimal_instance(name: str) -> None:
    schema = _schemas()[name]
    if name == "nested":  # patterns are not followed by the fake engine: drop them here
        schema = json.loads(json.dumps(schema).replace('"pattern": "^[0-9]{5}$"', '"minLength": 5')
                            .replace('"pattern": "^[A-Z]{3}-[0-9]{2}$"', '"minLength": 6'))
        value = minimal_instance(schema)
        jsonschema.validate(value, schema)
        return
    engine = FakeEngine()
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    result = await engine.generate(GenerationRequest(prompt="x", max_new_tokens=4096, response_format=fmt))
    assert result.finish_reason == "stop"
    jsonschema.validate(json.loads(result.text), schema)
    again = await engine.generate(GenerationRequest(prompt="y", max_new_tokens=4096, response_format=fmt))
    assert again.text == result.text  # deterministic


async def test_fake_engine_json_object_and_bounds() -> None:
    engine = FakeEngine()
    result = await engine.generate(GenerationRequest(prompt="x", response_format={"type": "json_object"}))
    assert result.text == "{}"
    with pytest.raises(UnsupportedSchema):
        await engine.generate(GenerationRequest(prompt="x", response_format={
            "type": "json_schema", "json_schema": {"schema": {"$ref": "http://evil/x"}}}))
    deep: dict[str, Any] = {}
    for _ in range(40):
        deep = {"type": "array", "items": deep}
    with pytest.raises(SchemaTooLarge):
        await engine.generate(GenerationRequest(prompt="x", response_format={
            "type": "json_schema", "json_schema": {"schema": deep}}))


def test_canonical_key_ignores_key_order() -> None:
    a = constraint_from({"type": "json_schema", "json_schema": {"schema": {"type": "object", "required": []}}})
    b = constraint_from({"type": "json_schema", "json_schema": {"schema": {"required": [], "type": "object"}}})
    assert a is not None and b is not None and a.key == b.key
    assert constraint_from({"type": "text"}) is None and constraint_from(None) is None


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "n": {"type": "integer"}}, "required": ["n"]}}},
         {"type": "function", "function": {"name": "g", "parameters": {"type": "object"}}}]


def test_tool_plans() -> None:
    required = plan_tools(TOOLS, "required", None)
    assert required.forced and required.render == TOOLS
    assert required.response_format is not None
    assert required.response_format["json_schema"]["schema"] == tool_call_schema(TOOLS)
    named = plan_tools(TOOLS, {"type": "function", "function": {"name": "g"}}, None)
    assert named.response_format is not None
    assert named.response_format["json_schema"]["schema"]["properties"]["name"] == {"const": "g"}
    auto = plan_tools(TOOLS, None, None)
    assert auto.response_format is None and auto.parse == TOOLS and not auto.forced
    assert plan_tools(TOOLS, "none", None).render is None
    for bad in ("sometimes", {"type": "function", "function": {"name": "h"}}):
        with pytest.raises(ValueError):
            plan_tools(TOOLS, bad, None)
    with pytest.raises(ValueError):
        plan_tools(TOOLS, "required", {"type": "json_object"})


def test_tool_call_text_is_read_back() -> None:
    assert parse_tool_call('<tool_call>{"name": "f", "arguments": {"n": 1}}</tool_call>', TOOLS) == \
        {"name": "f", "arguments": {"n": 1}}
    assert parse_tool_call(' {"name":"g","arguments":{}}', TOOLS) == {"name": "g", "arguments": {}}
    for text in ("hello", '{"name": "h", "arguments": {}}', '{"name": "f", "arguments": 3}', "{broken"):
        assert parse_tool_call(text, TOOLS) is None
    hold = ToolCallHold(plan_tools(TOOLS, "auto", None))
    assert hold.push("<tool") == "" and hold.push('_call>{"name":"f","arguments":{"n":2}}') == ""
    rest, calls = hold.finish()
    assert rest == "" and calls is not None and json.loads(calls[0]["function"]["arguments"]) == {"n": 2}
    plain = ToolCallHold(plan_tools(TOOLS, "auto", None))
    assert plain.push("  Hi") == "  Hi" and plain.push(" there") == " there" and plain.finish() == ("", None)


def test_tools_reach_a_template_without_tool_support() -> None:
    text = render_chat(FakeTokenizer(), [{"role": "user", "content": "hi"}], TOOLS)
    assert text.startswith("<|system|>") and '"name": "f"' in text and "<tool_call>" in text


async def test_http_tool_call_on_the_fake_engine() -> None:
    async with HTTPServer(create_app(FakeEngine()), port=0) as server:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0)
        r = await client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "go"}],
                                                 tools=TOOLS, tool_choice="required")  # type: ignore[arg-type]
        call = (r.choices[0].message.tool_calls or [])[0]
        assert r.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "f" and json.loads(call.function.arguments) == {"n": 0}  # type: ignore[union-attr]
        await client.close()
