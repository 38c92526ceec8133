"""Constrained generation over the mesh: real SmolLM2 nodes on real brokers, the schema carried
end to end (router, node, gateway), a failover mid-output resuming under the same grammar, and
a node that cannot constrain refusing with a typed reason instead of answering free text."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import jsonschema
import openai
import pytest

from sdk.identity import Key
from sdk.inference import GenerationRequest
from sdk.inference.constraints import InvalidSchema
from sdk.inference.server import HTTPServer
from sdk.mesh import MeshNode, NoNode, issue_access_credential
from sdk.mesh.gateway import create_gateway_app
from tests.mesh.conftest import MODEL, MeshEnv

pytestmark = [pytest.mark.model, pytest.mark.broker, pytest.mark.slow]

SCHEMA = {
    "type": "object",
    "properties": {
        "layout": {"enum": ["grid", "list", "carousel"]},
        "columns": {"type": "integer", "minimum": 1, "maximum": 6},
        "panels": {"type": "array", "items": {"enum": ["clock", "media", "map"]}, "minItems": 1, "maxItems": 3},
        "dark_mode": {"type": "boolean"},
    },
    "required": ["layout", "columns", "panels", "dark_mode"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "layout", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Pick a home-screen layout for a small watch, as JSON."}]


def request(**fields: Any) -> GenerationRequest:
    fields.setdefault("temperature", 0.0)
    fields.setdefault("response_format", FORMAT)
    return GenerationRequest(messages=MESSAGES, max_new_tokens=96, **fields)


@pytest.fixture
def wide_vc(access_issuer: Key, peer_key: Key) -> Any:
    return issue_access_credential(access_issuer, peer_key.did, models=[MODEL], max_tokens=256)


async def test_constrained_request_through_the_mesh(mesh_env: MeshEnv, node_engines: list[Any], peer_key: Key,
                                                    wide_vc: Any) -> None:
    await mesh_env.node(0)
    mesh = await mesh_env.router(peer_key, [wide_vc])
    reference = await node_engines[2].generate(request())
    result = await mesh.generate(request())
    assert result.finish_reason == "stop" and result.token_ids == reference.token_ids
    jsonschema.validate(json.loads(result.text), SCHEMA)
    sampled = await mesh.generate(request(temperature=1.0, seed=9))
    jsonschema.validate(json.loads(sampled.text), SCHEMA)
    with pytest.raises(InvalidSchema):  # checked before any node is asked
        await mesh.generate(request(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}))


async def test_failover_mid_output_keeps_the_grammar(embedded_env: MeshEnv, node_engines: list[Any], peer_key: Key,
                                                     wide_vc: Any) -> None:
    nodes = [await embedded_env.node(0), await embedded_env.node(1)]
    mesh = await embedded_env.router(peer_key, [wide_vc], nodes=2)
    reference = await node_engines[2].generate(request())
    chunks = []
    killed: MeshNode | None = None
    async for chunk in mesh.stream(request()):
        chunks.append(chunk)
        if len(chunks) == 4:
            killed = next(n for n in nodes if n.active)
            await killed.abort()
    assert killed is not None and mesh.counters["failovers"] == 1
    text = "".join(c.text for c in chunks)
    assert [t for c in chunks for t in c.token_ids] == reference.token_ids and text == reference.text
    jsonschema.validate(json.loads(text), SCHEMA)


async def test_node_without_grammar_library_refuses_and_the_router_moves_on(
        embedded_env: MeshEnv, node_engines: list[Any], make_engine: Callable[..., Any], peer_key: Key, wide_vc: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await node_engines[1].grammar_compiler()  # this engine's grammar library was loaded before
    monkeypatch.setitem(sys.modules, "llguidance", None)  # ...and from now on it cannot be imported
    embedded_env.engines = [make_engine(max_batch_size=1), node_engines[1]]
    # the node claims constrained output it cannot give (found at start it would advertise only tools,
    # and routers would not ask it: tests/mesh/test_node_features.py); its refusal is the backstop
    bare = await embedded_env.node(0, features=("json_object", "json_schema", "tools"))
    mesh = await embedded_env.router(peer_key, [wide_vc], nodes=1)
    with pytest.raises(NoNode, match="structured_output_unavailable"):
        await mesh.generate(request())
    assert bare.refusals["structured_output_unavailable"] == 1 and bare.served == 0
    able = await embedded_env.node(1)
    await mesh.wait_for_nodes(2, model=MODEL, timeout=10)
    for _ in range(2):  # whichever node is asked first, the answer is constrained
        result = await mesh.generate(request())
        jsonschema.validate(json.loads(result.text), SCHEMA)
    assert able.served == 2


async def test_gateway_response_format_and_tool_call(embedded_env: MeshEnv, peer_key: Key, wide_vc: Any) -> None:
    await embedded_env.node(0)
    mesh = await embedded_env.router(peer_key, [wide_vc])
    tool = {"type": "function", "function": {"name": "set_layout", "description": "Apply a layout",
                                             "parameters": SCHEMA}}
    async with HTTPServer(create_gateway_app(mesh), port=0) as server:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
        chat = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=96, temperature=0,
                                                    response_format=FORMAT)  # type: ignore[arg-type]
        jsonschema.validate(json.loads(chat.choices[0].message.content or ""), SCHEMA)
        call = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=120, temperature=0,
                                                    tools=[tool], tool_choice="required")  # type: ignore[list-item]
        assert call.choices[0].finish_reason == "tool_calls"
        fn = (call.choices[0].message.tool_calls or [])[0].function  # type: ignore[union-attr]
        assert fn.name == "set_layout"
        jsonschema.validate(json.loads(fn.arguments), SCHEMA)
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "if": {}}}})  # type: ignore[arg-type]
        assert info.value.body["code"] == "unsupported_schema"  # type: ignore[index]
        await client.close()
