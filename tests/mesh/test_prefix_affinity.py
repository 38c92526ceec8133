"""Prefix affinity: keyed block hashes, node summaries, conversations kept on their node."""

from __future__ import annotations

import asyncio
import random

import pytest

from sdk.inference import GenerationRequest
from sdk.mesh import RateLimit, RouterConfig
from sdk.mesh.adverts import NodeAdvert
from sdk.mesh.capacity import Capacity
from sdk.mesh.prefixes import (
    AffinityMap,
    PrefixHasher,
    PrefixIndex,
    PrefixSummary,
    continuation,
    derive_prefix_key,
    prompt_bytes,
)
from sdk.testing import FakeEngine
from tests.fixtures.brokers import BROKER_PARAMS
from tests.fixtures.waiting import until
from tests.mesh.routing_env import MODEL, PREFIX_KEY, FakeMesh, fake_mesh

SYSTEM = ("You are the assistant of a phone fleet. Answer briefly, in the user's language, and never reveal "
          "device identifiers. " * 3)
REPLY = "Noted, checking."
CAP = Capacity(prefill_1=400.0, decode_1=20.0, prefill_full=800.0, decode_full=60.0, batch=8)


def chat_turns(user: str, turns: int, reply: str | None = None) -> list[list[dict[str, str]]]:
    """The message lists of a chat's turns, as a client resends them (the FakeEngine's reply:
    ``reply``, default its echo of the user's message)."""
    history = [{"role": "system", "content": SYSTEM}]
    out = []
    for t in range(turns):
        detail = " ".join(f"{user}-{t}-{w}" for w in range(12))  # what this user pasted: ~120 bytes
        history = [*history, {"role": "user", "content": f"{user}, question {t}: what does this log say? {detail}"}]
        out.append(history)
        answer = reply if reply is not None else f"Echo: {history[-1]['content']}"
        history = [*history, {"role": "assistant", "content": answer}]
    return out


# ------------------------------------------------------------------ hashing


def test_the_next_turn_matches_the_blocks_of_the_last_prompt_and_its_reply() -> None:
    hasher = PrefixHasher(PREFIX_KEY)
    turns = chat_turns("ann", 3)
    first = prompt_bytes(messages=turns[0])
    seen = hasher.chain(continuation(first, "Echo: " + turns[0][-1]["content"]))
    nxt = hasher.chain(prompt_bytes(messages=turns[1]))
    assert len(seen) >= 4 and nxt[:len(seen)] == seen  # every block of turn 1 + reply is a prefix block of turn 2
    other = hasher.chain(prompt_bytes(messages=chat_turns("bob", 2)[1]))
    shared = sum(1 for a, b in zip(nxt, other, strict=False) if a == b)
    assert 0 < shared < len(seen)  # only the system prompt's blocks are shared between chats


def test_hashes_depend_on_the_mesh_key_and_reveal_no_text() -> None:
    data = prompt_bytes(prompt=SYSTEM)
    a, b = PrefixHasher(PREFIX_KEY).chain(data), PrefixHasher(derive_prefix_key("another mesh's secret!")).chain(data)
    assert a and not set(a) & set(b)
    assert all(len(h) == 8 for h in a) and SYSTEM[:8].encode() not in b"".join(a)
    with pytest.raises(ValueError):
        derive_prefix_key("short")
    assert PrefixIndex(PrefixHasher(None)).summary() is None  # no mesh key: nothing advertised


def test_summary_round_trips_bounded() -> None:
    index = PrefixIndex(PrefixHasher(PREFIX_KEY), capacity=64, advertise=16)
    chain = index.hasher.chain(prompt_bytes(prompt=SYSTEM * 16))
    index.add(chain)
    assert len(index) == min(len(chain), 64)
    summary = index.summary()
    assert summary is not None and len(summary.ordered) == 16
    body = NodeAdvert(node_id="n", did="did:key:z", epoch=1.0, seq=1, models=("m",), prefixes=summary).to_body()
    back = NodeAdvert.from_body(body).prefixes
    assert back is not None and back.hashes == summary.hashes and back.block == summary.block
    assert PrefixSummary(back.block, back.hashes).depth(chain) == 0  # only the newest 16: the leading blocks aged out
    assert index.lookup(chain) == len(chain) and index.hit_rate == 1.0


def test_affinity_map_remembers_where_each_prefix_went() -> None:
    amap, hasher = AffinityMap(per_hash=2), PrefixHasher(PREFIX_KEY)
    one, two = (hasher.chain(prompt_bytes(messages=chat_turns(u, 2)[1])) for u in ("ann", "bob"))
    amap.record(one, "a")
    amap.record(two, "b")
    assert amap.depth(one, "a") == len(one) and amap.depth(two, "b") == len(two)
    assert 0 < amap.depth(one, "b") < len(one)  # the system prompt went to both
    amap.forget("a")
    assert amap.depth(one, "a") == 0


# ------------------------------------------------------------------ on a broker


@pytest.mark.parametrize("kind", BROKER_PARAMS)
async def test_a_multi_turn_chat_stays_on_its_node_until_that_node_dies(kind: str) -> None:
    async with fake_mesh(kind) as env:
        nodes = [await env.node(capacity=CAP, prefix_key=PREFIX_KEY) for _ in range(2)]
        mesh = await env.router(RouterConfig(prefix_key=PREFIX_KEY))
        await mesh.wait_for_nodes(2, model=MODEL)
        turns = chat_turns("ann", 6)
        for messages in turns[:3]:
            result = await mesh.generate(messages=messages, max_new_tokens=512, model=MODEL)
            assert result.text == "Echo: " + messages[-1]["content"]
        home = next(n for n in nodes if n.served)
        assert home.served == 3 and home.prefixes.hit_rate > 0.5
        # the node's own advert now says it holds the chat (another router would see it too)
        await until(lambda: (mesh.table.get(home.node_id) or NodeAdvert("", "", 0, 0, ())).prefixes is not None
                    and len(mesh.table.get(home.node_id).prefixes.hashes) > 6)
        fresh = await env.router(RouterConfig(prefix_key=PREFIX_KEY))
        await fresh.wait_for_nodes(2, model=MODEL)
        await fresh.generate(messages=turns[3], max_new_tokens=512, model=MODEL)
        assert home.served == 4 and fresh.counters["affinity_kept"] + (fresh.ranked(MODEL)[0].advert.node_id
                                                                        == home.node_id) >= 1
        other = next(n for n in nodes if n is not home)
        await home.abort()
        await until(lambda: mesh.table.get(home.node_id) is None)
        for messages in turns[4:]:
            await mesh.generate(messages=messages, max_new_tokens=512, model=MODEL)
        assert other.served == 2 and mesh.affinity.depth(mesh._route(GenerationRequest(messages=turns[5])).chain,
                                                          other.node_id) > 0


async def _simulate(env: FakeMesh, *, affinity: bool, chats: int, turns: int, concurrency: int) -> float:
    """Run ``chats`` chats of ``turns`` turns, ``concurrency`` at a time, over 2 nodes; the nodes' hit rate."""
    nodes = [await env.node(FakeEngine(reply=REPLY, token_delay=0.01), capacity=CAP, prefix_key=PREFIX_KEY,
                               rate_limit=RateLimit(1000, 1000)) for _ in range(2)]
    mesh = await env.router(RouterConfig(prefix_key=PREFIX_KEY, affinity=affinity))
    await mesh.wait_for_nodes(2, model=MODEL)
    queue = [chat_turns(f"user{i}", turns, REPLY) for i in range(chats)]
    rng = random.Random(7)
    rng.shuffle(queue)

    async def worker() -> None:
        while queue:
            for messages in queue.pop():
                await mesh.generate(messages=messages, max_new_tokens=512, model=MODEL)
                await asyncio.sleep(rng.uniform(0.0, 0.1))  # the user reads and types: chats drift apart

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    asked = sum(n.prefixes.blocks_asked for n in nodes)
    hit = sum(n.prefixes.blocks_hit for n in nodes)
    assert all(n.served for n in nodes), "both nodes must take traffic"
    print(f"affinity={affinity}: served {[n.served for n in nodes]}, kept {mesh.counters['affinity_kept']}")
    for node in nodes:
        await node.aclose()
    env.nodes.clear()
    return hit / asked


@pytest.mark.slow
async def test_affinity_hit_rate_beats_load_only_routing_in_a_many_chat_simulation() -> None:
    async with fake_mesh("embedded") as env:
        load_only = await _simulate(env, affinity=False, chats=16, turns=8, concurrency=6)
        with_affinity = await _simulate(env, affinity=True, chats=16, turns=8, concurrency=6)
    print(f"prefix hit rate: affinity {with_affinity:.1%}, load only {load_only:.1%}")
    assert with_affinity >= 0.8
    # a node that served an older turn of the chat still holds most of it, so load-only routing
    # hits too (how often depends on timing); what affinity removes is the prefill of the turns in
    # between. The size of the gain is a benchmark figure (bench/routing_bench.py), not asserted here.
    assert with_affinity > load_only
