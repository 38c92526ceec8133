"""FakeEngine: the Engine interface without torch: deterministic text, usage, limits, cancellation;
a MeshNode, a Mesh router (failover included) and the HTTP app take it as they take the engine."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sdk.identity import Key
from sdk.inference import EngineClosed, GenerationRequest, InvalidRequest, PromptTooLong
from sdk.inference.backend import as_backend
from sdk.testing import FakeEngine, TestIssuer, running_broker
from sdk.testing.fake_engine import prompt_text
from sdk.testing.waiting import until


async def test_stream_is_deterministic_with_ids_text_and_usage_in_the_last_chunk() -> None:
    engine = FakeEngine()
    req = GenerationRequest(prompt="Hi there", max_new_tokens=64)
    chunks = [c async for c in engine.stream(req)]
    assert "".join(c.text for c in chunks) == "Echo: Hi there" == engine.expected("Hi there")
    assert [t for c in chunks for t in c.token_ids] == [ord(c) for c in "Echo: Hi there"]
    assert all(c.usage is None and c.finish_reason is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (8, 14)
    again = await engine.generate(req)
    assert again.text == "Echo: Hi there" and again.token_ids == [ord(c) for c in again.text]
    assert engine.completed == 2 and engine.stats()["requests"] == 2


async def test_length_stop_strings_messages_and_token_ids() -> None:
    engine = FakeEngine(reply=lambda p: p.upper())
    cut = await engine.generate(GenerationRequest(prompt="abcdef", max_new_tokens=3))
    assert (cut.text, cut.finish_reason, cut.usage.completion_tokens) == ("ABC", "length", 3)
    stopped = await engine.generate(GenerationRequest(prompt="one, two, three", stop=[", T"]))
    assert (stopped.text, stopped.finish_reason) == ("ONE", "stop")
    chat = await engine.generate(GenerationRequest(messages=[{"role": "system", "content": "be short"},
                                                             {"role": "user", "content": "hello"}]))
    assert chat.text == "HELLO"
    ids = await engine.generate(GenerationRequest(prompt_token_ids=[ord("o"), ord("k")]))
    assert ids.text == "OK"
    assert prompt_text(engine.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])) == "x"
    fixed = FakeEngine(reply="always this")
    assert (await fixed.generate(GenerationRequest(prompt="whatever"))).text == "always this"


async def test_bad_requests_raise_the_engines_errors_before_any_chunk() -> None:
    engine = FakeEngine(max_sequence_length=8)
    with pytest.raises(InvalidRequest) as bad:
        await engine.generate(GenerationRequest(prompt="x", max_new_tokens=0))
    assert bad.value.field == "max_new_tokens" and bad.value.reason == "invalid_request"
    with pytest.raises(PromptTooLong):
        await engine.generate(GenerationRequest(prompt="much too long"))
    with pytest.raises(InvalidRequest):
        await engine.generate(GenerationRequest(prompt_token_ids=[0x110000]))
    await engine.aclose()
    with pytest.raises(EngineClosed):
        await engine.generate(GenerationRequest(prompt="x"))
    assert engine.requests == []


async def test_a_consumer_that_stops_early_cancels_and_cancel_ends_a_stream() -> None:
    engine = FakeEngine(reply="x" * 100, token_delay=0.001)
    stream = engine.stream(GenerationRequest(prompt="p", max_new_tokens=100, request_id="early"))
    got = [await anext(stream) for _ in range(3)]
    assert engine.stats()["active_streams"] == 1
    await stream.aclose()
    assert len(got) == 3 and engine.cancelled == ["early"] and engine.stats()["active_streams"] == 0

    chunks: list[Any] = []

    async def consume() -> None:
        async for chunk in engine.stream(GenerationRequest(prompt="p", max_new_tokens=100, request_id="r2")):
            chunks.append(chunk)

    task = asyncio.ensure_future(consume())
    await until(lambda: len(chunks) >= 2, 5, "two chunks")
    assert engine.cancel("r2") and not engine.cancel("unknown")
    await asyncio.wait_for(task, 5)
    assert chunks[-1].finish_reason == "cancelled" and len(chunks) < 100
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(chunks) - 1
    assert engine.cancelled == ["early", "r2"]


def test_metadata_and_stats_have_the_engines_shape() -> None:
    engine = FakeEngine(model="tiny", max_batch_size=2, max_sequence_length=64)
    assert engine.metadata["name"] == "tiny" and engine.metadata["context_length"] == 64
    stats = engine.stats()
    for name in ("queue_depth", "active_streams", "max_batch_size", "tokens_per_s", "free_cache_tokens"):
        assert isinstance(stats[name], int | float), name
    assert as_backend(engine).models()[0]["name"] == "tiny"


def test_importing_it_loads_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys, sdk.testing.fake_engine; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.broker
async def test_a_mesh_node_serves_it_and_a_router_fails_over_mid_stream() -> None:
    from sdk.mesh import AccessPolicy, Mesh, MeshNode, NodeConfig, NodePolicy

    issuer = TestIssuer()
    async with running_broker("embedded") as broker:
        issuer.bind(broker.url)
        await issuer.publish()
        engines = [FakeEngine(reply=lambda p: "0123456789" * 4, token_delay=0.01) for _ in range(2)]
        keys = [Key.generate() for _ in engines]
        nodes = [MeshNode(e, broker.url, key=k, access=AccessPolicy(issuer.trust),
                          credential=issuer.node(k, models=["fake-model"]), config=NodeConfig(advert_interval=0.5),
                          **broker.credentials(k)) for e, k in zip(engines, keys, strict=True)]
        peer = Key.generate()
        router = Mesh(broker.url, peer, credentials=[issuer.access(peer)], node_policy=NodePolicy(issuer.trust),
                      **broker.credentials(peer))
        try:
            for node in nodes:
                await node.start()
            await router.start()
            await router.wait_for_nodes(2, model="fake-model", timeout=10)
            text, killed = "", None
            async for chunk in router.stream(GenerationRequest(prompt="count", max_new_tokens=40, model="fake-model")):
                text += chunk.text
                if len(text) == 5 and killed is None:
                    killed = next(n for n in nodes if n.active)
                    await killed.abort()
            assert text == "0123456789" * 4                      # the second node continued the reply
            survivor = next(n for n in nodes if n is not killed)
            assert survivor.served == 1
            resumed = survivor.engine.requests[-1]
            assert resumed.prompt_token_ids is not None and len(resumed.prompt_token_ids) > len("count")
        finally:
            await router.aclose()
            for node in nodes:
                await node.aclose()
            await issuer.aclose()


async def test_the_http_app_serves_it() -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from sdk.inference.http.app import create_app

    app = create_app(FakeEngine())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]] == ["fake-model"]
        reply = await client.post("/v1/completions", json={"model": "fake-model", "prompt": "hey", "max_tokens": 32})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["choices"][0]["text"] == "Echo: hey" and body["usage"]["completion_tokens"] == 9
