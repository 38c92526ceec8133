"""The mesh end to end: real SmolLM2 engines as nodes, real brokers, real credentials and crypto."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sdk.identity import Key
from sdk.inference import GenerationRequest
from sdk.mesh import MeshNode, MeshTimeout, NoNode
from tests.mesh.conftest import MODEL, MeshEnv

pytestmark = [pytest.mark.model, pytest.mark.broker, pytest.mark.slow]

PROMPT = "The capital of France is"


def greedy(max_new_tokens: int = 12, prompt: str = PROMPT) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_new_tokens=max_new_tokens, temperature=0.0)


async def test_generate_matches_engine_and_load_spreads(mesh_env: MeshEnv, node_engines: list[Any],
                                                        peer_key: Key, access_vc: Any) -> None:
    a = await mesh_env.node(0)
    b = await mesh_env.node(1)
    mesh = await mesh_env.router(peer_key, [access_vc], nodes=2)
    reference = await node_engines[2].generate(greedy())

    result = await mesh.generate(greedy())
    assert result.text == reference.text and result.token_ids == reference.token_ids
    assert result.usage.prompt_tokens == reference.usage.prompt_tokens
    assert result.usage.completion_tokens == len(reference.token_ids)

    before = (a.served, b.served)
    results = await asyncio.gather(*(mesh.generate(greedy(6, f"Question {i}: what is {i} plus {i}?"))
                                     for i in range(6)))
    assert all(r.finish_reason in ("stop", "length") for r in results)
    assert a.served > before[0] and b.served > before[1], (a.served, b.served)
    ranked = mesh.ranked(MODEL)
    assert {v.advert.node_id for v in ranked} == {"node-0", "node-1"}
    assert set(ranked[0].rank.parts) == {"throughput", "stability", "load", "latency"}


async def test_node_killed_mid_stream_completes_elsewhere(mesh_env: MeshEnv, node_engines: list[Any],
                                                          peer_key: Key, access_vc: Any) -> None:
    nodes = [await mesh_env.node(0), await mesh_env.node(1)]
    mesh = await mesh_env.router(peer_key, [access_vc], nodes=2)
    reference = await node_engines[2].generate(greedy(20))

    chunks = []
    killed: MeshNode | None = None
    async for chunk in mesh.stream(greedy(20)):
        chunks.append(chunk)
        if len(chunks) == 4:
            killed = next(n for n in nodes if n.active)
            await killed.abort()
    assert killed is not None
    assert "".join(c.text for c in chunks) == reference.text
    assert [t for c in chunks for t in c.token_ids] == reference.token_ids
    assert chunks[-1].finish_reason == reference.finish_reason
    assert chunks[-1].usage.completion_tokens == len(reference.token_ids)
    assert chunks[-1].usage.prompt_tokens == reference.usage.prompt_tokens
    assert mesh.counters["failovers"] == 1
    assert mesh.failures == {"node_lost": 1}  # the will, not the stall timeout, triggered it
    survivor = next(n for n in nodes if n is not killed)
    assert survivor.served == 1
    assert killed.node_id not in {a.node_id for a in mesh.nodes()}


async def test_last_node_dying_is_a_typed_error(embedded_env: MeshEnv, peer_key: Key, access_vc: Any) -> None:
    node = await embedded_env.node(0)
    mesh = await embedded_env.router(peer_key, [access_vc])
    with pytest.raises(NoNode) as info:
        async for _chunk in mesh.stream(greedy(40)):
            if node.active:
                await node.abort()
    assert info.value.reason == "no_node"


async def test_caller_cancellation_frees_the_engine_slot(embedded_env: MeshEnv, node_engines: list[Any],
                                                         peer_key: Key, access_vc: Any) -> None:
    node = await embedded_env.node(0)
    mesh = await embedded_env.router(peer_key, [access_vc])
    stream = mesh.stream(greedy(60))
    got = 0
    async for _chunk in stream:
        got += 1
        if got == 2:
            break
    await stream.aclose()
    for _ in range(200):
        if node.cancelled == 1 and node.active == 0 and node_engines[0].stats()["active_streams"] == 0:
            break
        await asyncio.sleep(0.05)
    assert node.cancelled == 1 and node.active == 0
    assert node_engines[0].stats()["active_streams"] == 0
    assert node.served == 0  # it never ran to its 60 tokens


class StallingNode(MeshNode):
    """A real node that goes silent (still connected, still advertising) after three chunks."""

    async def _generate(self, req: Any, held: int) -> Any:
        sent = 0
        async for body in super()._generate(req, held):
            if sent == 3:
                await asyncio.sleep(3600)
            yield body
            sent += 1


async def test_stalled_node_is_replaced_after_the_stall_timeout(embedded_env: MeshEnv, node_engines: list[Any],
                                                                 peer_key: Key, access_vc: Any) -> None:
    from sdk.mesh import AccessPolicy, NodeConfig

    key = Key.generate()
    stalling = StallingNode(node_engines[0], embedded_env.url, key=key, access=AccessPolicy(embedded_env.trust),
                            credential=embedded_env.node_credential(key, "stalling"),
                            config=NodeConfig(node_id="stalling", advert_interval=1.0))
    await stalling.start()
    embedded_env.nodes.append(stalling)
    mesh = await embedded_env.router(peer_key, [access_vc], nodes=1, stall_timeout=0.5)
    reference = await node_engines[2].generate(greedy(12))
    chunks = []
    async for chunk in mesh.stream(greedy(12)):  # the stalling node is the only one at first
        chunks.append(chunk)
        if len(chunks) == 1:
            healthy = await embedded_env.node(1)
            await mesh.wait_for_nodes(2, model=MODEL)
    assert "".join(c.text for c in chunks) == reference.text
    assert [t for c in chunks for t in c.token_ids] == reference.token_ids
    assert mesh.failures == {"timeout": 1} and mesh.counters["failovers"] == 1
    assert healthy.served == 1 and stalling.cancelled == 1  # the router's cancel reached the silent node


async def test_only_node_stalling_is_a_timeout(embedded_env: MeshEnv, node_engines: list[Any], peer_key: Key,
                                               access_vc: Any) -> None:
    from sdk.mesh import AccessPolicy, NodeConfig

    key = Key.generate()
    stalling = StallingNode(node_engines[0], embedded_env.url, key=key, access=AccessPolicy(embedded_env.trust),
                            credential=embedded_env.node_credential(key, "stalling"),
                            config=NodeConfig(node_id="stalling", advert_interval=1.0))
    await stalling.start()
    embedded_env.nodes.append(stalling)
    mesh = await embedded_env.router(peer_key, [access_vc], nodes=1, stall_timeout=0.3)
    got = []
    with pytest.raises(MeshTimeout) as info:
        async for chunk in mesh.stream(greedy(12)):
            got.append(chunk)
    assert info.value.reason == "timeout" and len(got) == 3


async def test_failover_inside_a_multibyte_character(embedded_env: MeshEnv, node_engines: list[Any], peer_key: Key,
                                                     access_vc: Any) -> None:
    """Killed while the text of the last tokens was held back (half an emoji): the next node emits it."""
    nodes = [await embedded_env.node(0), await embedded_env.node(1)]
    mesh = await embedded_env.router(peer_key, [access_vc], nodes=2)
    request = greedy(12, "Emoji party: 🎉🎉")
    reference = [c async for c in node_engines[2].stream(request)]
    assert reference[3].text == "" and reference[4].text == ""  # 🎉 is three tokens: two held, then the text
    chunks = []
    async for chunk in mesh.stream(request):
        chunks.append(chunk)
        if len(chunks) == 5:
            await next(n for n in nodes if n.active).abort()
    assert "".join(c.text for c in chunks) == "".join(c.text for c in reference)
    assert [t for c in chunks for t in c.token_ids] == [t for c in reference for t in c.token_ids]
    assert mesh.failures == {"node_lost": 1}


async def test_invalid_request_is_refused_before_any_node_is_asked(embedded_env: MeshEnv, peer_key: Key,
                                                                   access_vc: Any) -> None:
    from sdk.inference.errors import InvalidRequest

    node = await embedded_env.node(0)
    mesh = await embedded_env.router(peer_key, [access_vc])
    with pytest.raises(InvalidRequest) as info:
        async for _chunk in mesh.stream(prompt="hi", max_new_tokens=4, temperature=float("nan")):
            pass
    assert info.value.reason == "invalid_request" and info.value.field == "temperature"
    assert node.served == 0 and not node.refusals  # no node saw it
    assert (await mesh.generate(greedy(4))).text  # the same router still serves valid requests
