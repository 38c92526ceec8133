"""Advertised request features: nodes list the constrained output and tools they honour, routers
send requests needing them only there (first choice and failover), and refuse at once with
``no_capable_node`` when no live node lists them; malformed feature lists are refused."""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import openai
import pytest

from sdk.identity import Key
from sdk.inference import GenerationRequest
from sdk.inference.server import HTTPServer
from sdk.mesh import NoCapableNode, NodeAdvert, NodeConfig
from sdk.mesh import topics as mesh_topics
from sdk.mesh.adverts import MAX_FEATURES, NodeLoad, engine_features, parse_features, request_features
from sdk.mesh.capacity import AdvertFieldError
from sdk.mesh.gateway import create_gateway_app
from sdk.mesh.protocol import ADVERT
from sdk.messaging import SecureClient
from sdk.messaging.topics import client_token
from sdk.testing import FakeEngine
from tests.fixtures.brokers import BROKER_PARAMS
from tests.fixtures.waiting import until
from tests.mesh.routing_env import MODEL, fake_mesh

ALL = ("json_object", "json_schema", "tools")
SCHEMA = {"type": "object", "properties": {"note": {"type": "string", "minLength": 48}}, "required": ["note"]}
FORMAT = {"type": "json_schema", "json_schema": {"name": "note", "schema": SCHEMA}}
MESSAGES = [{"role": "user", "content": "Write a note."}]
TOOL = {"type": "function", "function": {"name": "set_layout", "parameters": {"type": "object"}}}


def constrained(i: int = 0, **fields: Any) -> GenerationRequest:
    fields.setdefault("response_format", FORMAT)
    return GenerationRequest(messages=[{"role": "user", "content": f"note {i}"}], max_new_tokens=96, model=MODEL,
                             **fields)


# ------------------------------------------------------------------ the advert field


def test_features_round_trip_sorted_and_absent_when_none() -> None:
    advert = NodeAdvert(node_id="n", did="did:key:z", epoch=1.0, seq=1, models=("m",), features=("tools", "json_schema"))
    body = advert.to_body()
    assert NodeAdvert.from_body(body).features == ("json_schema", "tools")
    bare = NodeAdvert(node_id="n", did="did:key:z", epoch=1.0, seq=1, models=("m",)).to_body()
    assert "features" not in bare and NodeAdvert.from_body(bare).features == ()  # an older node's advert
    assert parse_features(["video.v2"]) == ("video.v2",)  # a newer feature's name is kept


@pytest.mark.parametrize("features", [
    "json_schema",  # not a list
    {"json_schema": True},
    [f"f{i}" for i in range(MAX_FEATURES + 1)],  # oversized
    ["json_schema", "json_schema"],
    ["JSON_SCHEMA"],
    ["x" * 33],
    ["tools\n"],
    [""],
    [7],
    [None],
])
def test_malformed_features_reject_the_advert(features: Any) -> None:
    good = NodeAdvert(node_id="n", did="did:key:z", epoch=1.0, seq=1, models=("m",), features=ALL).to_body()
    with pytest.raises(AdvertFieldError) as info:
        NodeAdvert.from_body({**good, "features": features})
    assert info.value.field == "features" and info.value.reason == "malformed_advert"


def test_declared_features_are_checked() -> None:
    assert NodeConfig(features=("tools",)).features == ("tools",)
    with pytest.raises(ValueError, match="features"):
        NodeConfig(features=("Tools!",))


def test_what_a_request_needs() -> None:
    assert request_features(GenerationRequest(prompt="x")) == frozenset()
    assert request_features(constrained()) == {"json_schema"}
    assert request_features(constrained(response_format={"type": "json_object"})) == {"json_object"}
    assert request_features(GenerationRequest(messages=MESSAGES, tools=[TOOL])) == {"tools"}
    both = GenerationRequest(messages=MESSAGES, tools=[TOOL], response_format={"type": "json_object"})
    assert request_features(both) == {"json_object", "tools"}


async def test_fake_engine_advertises_and_honours_only_its_features() -> None:
    assert await engine_features(FakeEngine()) == ALL
    plain = FakeEngine(features=())
    assert await engine_features(plain) == ()
    from sdk.inference.constraints import StructuredOutputUnavailable

    with pytest.raises(StructuredOutputUnavailable):
        await plain.generate(constrained())
    with pytest.raises(StructuredOutputUnavailable):
        await FakeEngine(features=("json_schema",)).generate(GenerationRequest(messages=MESSAGES, tools=[TOOL]))
    assert (await plain.generate(GenerationRequest(prompt="hi"))).text == "Echo: hi"
    assert await engine_features(object()) == ()  # an engine that says nothing advertises nothing


# ------------------------------------------------------------------ routing on a broker


@pytest.mark.parametrize("kind", BROKER_PARAMS)
async def test_constrained_requests_go_only_to_the_capable_node(kind: str) -> None:
    async with fake_mesh(kind) as env:
        able = await env.node(FakeEngine(token_delay=0.005))
        plain = await env.node(FakeEngine(token_delay=0.005, features=()))
        assert able.features == ALL and plain.features == ()
        mesh = await env.router()
        await mesh.wait_for_nodes(2, model=MODEL)
        assert {a.node_id: a.features for a in mesh.nodes()} == {able.node_id: ALL, plain.node_id: ()}
        # concurrent requests spread over both nodes by load: the constrained ones still all land on one
        results = await asyncio.gather(*(mesh.generate(constrained(i)) for i in range(6)))
        assert all(r.text.startswith('{"note":"aaaa') for r in results)
        assert (able.served, plain.served) == (6, 0) and not plain.refusals
        tools = GenerationRequest(messages=MESSAGES, tools=[TOOL], max_new_tokens=16, model=MODEL)
        await mesh.generate(tools)
        assert (able.served, plain.served) == (7, 0)
        free = await asyncio.gather(*(mesh.generate(prompt=f"hello {i}", max_new_tokens=32, model=MODEL)
                                      for i in range(6)))
        assert [r.text for r in free] == [f"Echo: hello {i}" for i in range(6)]
        assert able.served > 7 and plain.served > 0 and able.served + plain.served == 13
        assert mesh.counters["no_capable_node"] == 0


@pytest.mark.parametrize("kind", BROKER_PARAMS)
async def test_only_incapable_nodes_is_a_typed_error_at_once(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    async with fake_mesh(kind) as env:
        plain = await env.node(FakeEngine(features=("tools",)))
        mesh = await env.router()  # the default first-token timeout is 30 s: nothing here waits for it
        await mesh.wait_for_nodes(1, model=MODEL)
        with caplog.at_level(logging.WARNING, logger="sdk.mesh.router"), pytest.raises(NoCapableNode) as info:
            await mesh.generate(constrained())
        assert info.value.reason == "no_capable_node" and info.value.needs == {"json_schema"}
        assert "advertises json_schema" in str(info.value) and "not routed" in caplog.text
        with pytest.raises(NoCapableNode, match="json_object"):
            await mesh.generate(constrained(response_format={"type": "json_object"}, tools=[TOOL]))
        assert plain.served == 0 and not plain.refusals and plain.engine.requests == []  # no node was asked
        assert mesh.counters["no_capable_node"] == 2
        await mesh.generate(GenerationRequest(messages=MESSAGES, tools=[TOOL], max_new_tokens=8, model=MODEL))
        assert (await mesh.generate(prompt="hi", max_new_tokens=8, model=MODEL)).text == "Echo: hi"
        assert plain.served == 2


@pytest.mark.parametrize("kind", BROKER_PARAMS)
async def test_failover_mid_stream_goes_only_to_a_capable_node(kind: str) -> None:
    async with fake_mesh(kind) as env:
        first = await env.node(FakeEngine(token_delay=0.02))
        plain = await env.node(FakeEngine(token_delay=0.02, features=()))
        second = await env.node(FakeEngine(token_delay=0.02))
        mesh = await env.router()
        await mesh.wait_for_nodes(3, model=MODEL)
        expected = FakeEngine().expected(constrained())
        text, killed = "", None
        async for chunk in mesh.stream(constrained()):
            text += chunk.text
            if killed is None and len(text) >= 5:
                killed = next(n for n in (first, second) if n.active)
                await killed.abort()
        assert killed is not None and text == expected and mesh.counters["failovers"] == 1
        survivor = second if killed is first else first
        assert survivor.served == 1 and plain.served == 0 and plain.engine.requests == []

        # now the only capable node dies mid-stream: no failover to the node without the feature
        text = ""
        with pytest.raises(NoCapableNode, match="no other node") as info:
            async for chunk in mesh.stream(constrained(1)):
                text += chunk.text
                if len(text) == 5:
                    await survivor.abort()
        assert "node_lost" in str(info.value) and plain.engine.requests == []


@pytest.mark.parametrize("kind", BROKER_PARAMS)
async def test_an_advert_with_a_malformed_features_list_is_refused(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    async with fake_mesh(kind) as env:
        plain = await env.node(FakeEngine(features=()))
        mesh = await env.router()
        await mesh.wait_for_nodes(1, model=MODEL)
        liar = Key.generate()
        client = SecureClient(env.broker.url, liar, **env.broker.credentials(liar))
        await client.connect()
        try:
            node_id = client_token(liar.did)
            advert = NodeAdvert(node_id=node_id, did=liar.did, epoch=time.time(), seq=1, models=(MODEL,),
                                load=NodeLoad(max_batch_size=64), interval_s=0.5).to_body()
            advert["features"] = ["json_schema"] * 5000  # oversized (and repeated)
            before = mesh.counters["adverts_rejected"]
            with caplog.at_level(logging.WARNING):
                await client.publish(mesh_topics.inference_ad(node_id), advert, type=ADVERT, retain=True, ttl=30,
                                     credentials=[env.issuer.node(liar, models=[MODEL])])
                await until(lambda: mesh.counters["adverts_rejected"] > before, timeout=10)
            assert "features: at most 32 names, got 5000" in caplog.text  # the node credential check parses it
            assert mesh.table.get(node_id) is None
            with pytest.raises(NoCapableNode):  # the liar claimed json_schema: it never became a candidate
                await mesh.generate(constrained())
            assert plain.served == 0
        finally:
            await client.aclose()


@pytest.mark.parametrize("kind", BROKER_PARAMS)
async def test_gateway_answers_no_capable_node_as_an_openai_503(kind: str) -> None:
    async with fake_mesh(kind) as env:
        await env.node(FakeEngine(features=()))
        mesh = await env.router()
        await mesh.wait_for_nodes(1, model=MODEL)
        async with HTTPServer(create_gateway_app(mesh), port=0) as server:
            client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0)
            with pytest.raises(openai.APIStatusError) as info:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,  # type: ignore[call-overload]
                                                     response_format=FORMAT)
            assert info.value.status_code == 503
            body: Any = info.value.body
            assert body["code"] == "no_capable_node" and body["type"] == "service_unavailable"
            assert "json_schema" in body["message"]
            chat = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8)  # type: ignore[arg-type]
            assert chat.choices[0].message.content
            await client.close()


@pytest.mark.parametrize("kind", BROKER_PARAMS)
async def test_nodes_listing_shows_the_features(kind: str) -> None:
    from rich.console import Console

    from sdk.cli.mesh_cmds import collect_nodes, nodes_table

    async with fake_mesh(kind) as env:
        able = await env.node(FakeEngine())
        plain = await env.node(FakeEngine(features=()))
        rows = await collect_nodes(env.broker.url, Key.generate(), model=MODEL, wait=1.5)
        features = {r["node"]: r["features"] for r in rows}
        assert features == {able.node_id: list(ALL), plain.node_id: []}
        console = Console(width=80, record=True)
        console.print(nodes_table(rows, title="nodes"))
        short = console.export_text()
        assert max(len(line) for line in short.splitlines()) <= 80 and "JST" in short and "S json_schema" in short
        console = Console(width=240, record=True)
        console.print(nodes_table(rows, title="nodes", wide=True))
        assert "json_object,json_schema,tools" in console.export_text()


# ------------------------------------------------------------------ the inference engine


@pytest.mark.model
@pytest.mark.slow
async def test_the_engine_advertises_constrained_output_only_with_a_working_grammar_library(
        make_engine: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    assert await engine_features(make_engine(max_batch_size=1)) == ALL
    monkeypatch.setitem(sys.modules, "llguidance", None)  # the grammar library cannot be imported
    assert await engine_features(make_engine(max_batch_size=1)) == ("tools",)
