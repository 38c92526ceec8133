"""Routing benchmark: prefix affinity vs load-only routing, 2 nodes, many multi-turn chats.

    python3 bench/routing_bench.py [--chats 50] [--turns 6] [--concurrency 8] [--prefill 2000]
                                   [--broker embedded|mosquitto] [--json bench/results/routing.json]

Two nodes on a loopback broker serve ``PrefillEngine`` s: the fake engine (no model) with a
simulated prefix cache and prefill cost — a request's first token waits ``uncached prompt
tokens / --prefill`` seconds, where the cached part is the longest prefix the node's engine has
seen (prompt + reply, LRU of 512 sequences) — so time to first token depends on where a chat
lands, as on a real engine with prefix caching. Chats share a system prompt; each turn resends
the whole history. The same chats run twice, once with ``RouterConfig(affinity=False)`` (the
estimate still ranks on load and capacity) and once with affinity; reported per run: engine
token hit rate (cached prompt tokens / prompt tokens), the nodes' block hit rate (what the
prefix summaries track), time to first token (median, p95) and the requests per node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdk.identity import Key
from sdk.inference.types import GenerationRequest, TokenChunk
from sdk.mesh import AccessPolicy, Capacity, Mesh, MeshNode, NodeConfig, NodePolicy, RateLimit, RouterConfig
from sdk.testing import FakeEngine, TestIssuer
from sdk.testing.brokers import running_broker

MODEL = "fake-model"
KEY = b"routing-bench-prefix-key-32bytes"
REPLY = "Noted; I am checking the device log you sent."
SYSTEM = ("You are the assistant of a fleet of phones and tablets. Answer briefly, in the user's language; "
          "never reveal device identifiers; when a log is pasted, name the failing component first. ") * 3


class PrefillEngine(FakeEngine):
    """A FakeEngine whose first token waits for the prefill of the prompt's uncached tokens."""

    def __init__(self, *, prefill_tokens_per_s: float, **options: Any) -> None:
        super().__init__(**options)
        self.prefill_rate = prefill_tokens_per_s
        self._seen: OrderedDict[tuple[int, ...], None] = OrderedDict()
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def _cached(self, ids: list[int]) -> int:
        best = 0
        for seq in self._seen:
            n = 0
            for a, b in zip(seq, ids, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return min(best, len(ids) - 1)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        ids = self.encode(request)
        cached = self._cached(ids)
        self.prompt_tokens += len(ids)
        self.cached_tokens += cached
        await asyncio.sleep((len(ids) - cached) / self.prefill_rate)
        out: list[int] = []
        async for chunk in super().stream(request):
            out.extend(chunk.token_ids)
            yield chunk
        self._seen[tuple(ids + out)] = None
        while len(self._seen) > 512:
            self._seen.popitem(last=False)


def chat(user: int, turns: int, rng: random.Random) -> list[list[dict[str, str]]]:
    history = [{"role": "system", "content": SYSTEM}]
    out = []
    for t in range(turns):
        log = " ".join(f"E{user:02d}{t}{rng.randrange(10**6):06d}" for _ in range(rng.randrange(8, 20)))
        history = [*history, {"role": "user", "content": f"Turn {t}: what does this say? {log}"}]
        out.append(history)
        history = [*history, {"role": "assistant", "content": REPLY}]
    return out


def ideal_hit_rate(chats: int, turns: int, seed: int = 7) -> float:
    """The token hit rate if every chat always found its whole history cached (only each turn's
    new message, and the first turn's past the system prompt, prefilled)."""
    engine, rng = FakeEngine(), random.Random(seed)
    tokens = lambda messages: len(engine.encode(GenerationRequest(messages=messages)))  # noqa: E731
    gen = len("<|assistant|>")  # the generation prompt: not part of the next turn's prefix
    system = tokens([{"role": "system", "content": SYSTEM}]) - gen
    total = uncached = 0
    for _ in range(chats):
        held = system
        for messages in chat(_, turns, rng):
            n = tokens(messages)
            total += n
            uncached += n - held
            held = tokens([*messages, {"role": "assistant", "content": REPLY}]) - gen
    return 1 - uncached / total


async def run(kind: str, *, affinity: bool, chats: int, turns: int, concurrency: int, prefill: float,
              seed: int = 7) -> dict[str, Any]:
    issuer = TestIssuer()
    capacity = Capacity(prefill_1=prefill, decode_1=200.0, prefill_full=prefill, decode_full=800.0, batch=8)
    async with running_broker(kind) as broker:
        issuer.bind(broker.url, broker.credentials(issuer.key))
        await issuer.publish()
        nodes, engines = [], []
        for _ in range(2):
            key = Key.generate()
            engine = PrefillEngine(prefill_tokens_per_s=prefill, reply=REPLY, token_delay=0.005)
            node = MeshNode(engine, broker.url, key=key, access=AccessPolicy(issuer.trust),
                            credential=issuer.node(key, models=[MODEL]), **broker.credentials(key),
                            config=NodeConfig(advert_interval=0.5, capacity=capacity, prefix_key=KEY,
                                              rate_limit=RateLimit(1000, 1000), max_streams_per_peer=64))
            await node.start()
            nodes.append(node)
            engines.append(engine)
        peer = Key.generate()
        mesh = Mesh(broker.url, peer, credentials=[issuer.access(peer)], node_policy=NodePolicy(issuer.trust),
                    config=RouterConfig(prefix_key=KEY, affinity=affinity), **broker.credentials(peer))
        await mesh.start()
        await mesh.wait_for_nodes(2, model=MODEL)
        rng = random.Random(seed)
        queue = [chat(i, turns, rng) for i in range(chats)]
        rng.shuffle(queue)
        ttfts: list[float] = []
        started = time.perf_counter()

        async def worker(wrng: random.Random) -> None:
            while queue:
                for messages in queue.pop():
                    result = await mesh.generate(messages=messages, max_new_tokens=256, model=MODEL)
                    ttfts.append(result.usage.time_to_first_token_s)
                    await asyncio.sleep(wrng.uniform(0.0, 0.2))  # the user reads and types

        await asyncio.gather(*(worker(random.Random(seed + i)) for i in range(concurrency)))
        elapsed = time.perf_counter() - started
        ttfts.sort()
        out = {
            "affinity": affinity, "requests": len(ttfts), "seconds": round(elapsed, 2),
            "engine_token_hit_rate": round(sum(e.cached_tokens for e in engines)
                                           / max(sum(e.prompt_tokens for e in engines), 1), 4),
            "node_block_hit_rate": round(sum(n.prefixes.blocks_hit for n in nodes)
                                         / max(sum(n.prefixes.blocks_asked for n in nodes), 1), 4),
            "ttft_median_s": round(statistics.median(ttfts), 4),
            "ttft_p95_s": round(ttfts[int(0.95 * (len(ttfts) - 1))], 4),
            "per_node": [n.served for n in nodes], "affinity_kept": mesh.counters["affinity_kept"],
        }
        await mesh.aclose()
        for node in nodes:
            await node.aclose()
        await issuer.aclose()
        return out


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chats", type=int, default=50)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--prefill", type=float, default=2000.0, help="simulated prefill tokens/s")
    ap.add_argument("--broker", default="embedded", choices=["embedded", "mosquitto"])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    runs = []
    for affinity in (False, True):
        result = await run(args.broker, affinity=affinity, chats=args.chats, turns=args.turns,
                           concurrency=args.concurrency, prefill=args.prefill)
        print(json.dumps(result))
        runs.append(result)
    load, aff = runs
    ideal = round(ideal_hit_rate(args.chats, args.turns), 4)
    summary = {"config": vars(args) | {"json": str(args.json) if args.json else None}, "load_only": load,
               "affinity": aff, "ideal_token_hit_rate": ideal, "ttft_median_change": round(aff["ttft_median_s"] / load["ttft_median_s"] - 1, 4)}
    print(f"hit rate (engine tokens): load-only {load['engine_token_hit_rate']:.1%}, "
          f"affinity {aff['engine_token_hit_rate']:.1%} (all history cached: {ideal:.1%}); median TTFT {load['ttft_median_s'] * 1000:.0f} -> "
          f"{aff['ttft_median_s'] * 1000:.0f} ms, p95 {load['ttft_p95_s'] * 1000:.0f} -> {aff['ttft_p95_s'] * 1000:.0f} ms")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    asyncio.run(main())
