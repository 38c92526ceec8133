#!/usr/bin/env python3
"""HTTP overhead benchmark: the same greedy requests through the engine directly and through the
OpenAI-compatible API (official ``openai`` async client, streaming), in one run on one machine.

    python3 bench/http_bench.py                      # CPU, bundled SmolLM2
    python3 bench/http_bench.py --concurrency 1 8 --new-tokens 64 --json out.json

Reports aggregate completion tokens/s and mean time to first token per concurrency level.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The history of the printing press begins in the fifteenth century, when",
    "Here is a detailed recipe for a classic French onion soup. First,",
    "The three most important ideas in modern physics are",
    "Dear diary, today was the strangest day of my life because",
    "In computer science, a hash table is a data structure that",
    "The mountain trail wound upward through the pine forest, and the hikers",
    "Count from 1 to 1000: 1, 2, 3,",
]


async def direct(engine: Any, n: int, new_tokens: int) -> tuple[int, float, list[float]]:
    """N concurrent engine streams: (completion tokens, seconds, ttfts)."""
    from sdk.inference import GenerationRequest

    async def one(prompt: str) -> tuple[int, float]:
        start = time.perf_counter()
        ttft, count = 0.0, 0
        req = GenerationRequest(prompt=prompt, max_new_tokens=new_tokens, temperature=0.0)
        async for chunk in engine.stream(req):
            if chunk.token_ids and not count:
                ttft = time.perf_counter() - start
            count += len(chunk.token_ids)
        return count, ttft

    start = time.perf_counter()
    results = await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)]) for i in range(n)))
    return sum(c for c, _ in results), time.perf_counter() - start, [t for _, t in results]


async def over_http(url: str, n: int, new_tokens: int) -> tuple[int, float, list[float]]:
    """N concurrent streamed completions through the API: (completion tokens, seconds, ttfts)."""
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)

    async def one(prompt: str) -> tuple[int, float]:
        start = time.perf_counter()
        ttft, tokens = 0.0, 0
        stream = await client.completions.create(model="bench", prompt=prompt, max_tokens=new_tokens,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text and not ttft:
                ttft = time.perf_counter() - start
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return tokens, ttft

    start = time.perf_counter()
    results = await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)]) for i in range(n)))
    await client.close()
    return sum(c for c, _ in results), time.perf_counter() - start, [t for _, t in results]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=2, help="best of N runs per cell (noisy hosts)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    import torch

    from sdk.inference import Engine, EngineConfig
    from sdk.inference.http import create_app
    from sdk.inference.server import HTTPServer

    engine = await Engine.start(EngineConfig(device=args.device, max_sequence_length=512,
                                             max_batch_size=max(args.concurrency)))
    app = create_app(engine, served_model_name="bench", max_concurrent=max(args.concurrency))
    rows: list[dict[str, Any]] = []
    try:
        async with HTTPServer(app) as srv:
            for n in args.concurrency:
                await direct(engine, 1, 4)  # settle
                d_runs, h_runs = [], []
                for _ in range(args.repeat):  # interleaved, so load changes hit both sides alike
                    d_runs.append(await direct(engine, n, args.new_tokens))
                    h_runs.append(await over_http(srv.url, n, args.new_tokens))
                d_tok, d_s, d_ttft = max(d_runs, key=lambda r: r[0] / r[1])
                h_tok, h_s, h_ttft = max(h_runs, key=lambda r: r[0] / r[1])
                rows.append({
                    "concurrency": n,
                    "engine_tokens_per_s": d_tok / d_s,
                    "http_tokens_per_s": h_tok / h_s,
                    "engine_ttft_s": statistics.mean(d_ttft),
                    "http_ttft_s": statistics.mean(h_ttft),
                    "tokens": [d_tok, h_tok],
                })
    finally:
        await engine.aclose()
    device = torch.cuda.get_device_name() if engine.device.type == "cuda" else platform.processor() or "cpu"
    print(f"device: {device}; threads: {torch.get_num_threads()}; new tokens: {args.new_tokens}")
    print(f"{'conc':>4} {'engine tok/s':>13} {'http tok/s':>11} {'ratio':>6} {'engine ttft':>12} {'http ttft':>10}")
    for r in rows:
        print(f"{r['concurrency']:>4} {r['engine_tokens_per_s']:>13.1f} {r['http_tokens_per_s']:>11.1f} "
              f"{r['http_tokens_per_s'] / r['engine_tokens_per_s']:>6.2f} {r['engine_ttft_s']:>11.3f}s "
              f"{r['http_ttft_s']:>9.3f}s")
    if args.json:
        args.json.write_text(json.dumps({"device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
