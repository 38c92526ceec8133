#!/usr/bin/env python3
"""KV-cache benchmark: memory of ``autoglm serve``, engine tokens/s by concurrency, prefix hit rate.

    python3 bench/kv_bench.py rss [--burst 8] [-- serve options...]   # idle RSS, after a burst, idle again
    python3 bench/kv_bench.py throughput [--concurrency 1 8 32] [--new-tokens 64]
    python3 bench/kv_bench.py prefix [--chats 8] [--turns 4]
    python3 bench/kv_bench.py all --json out.json
    ... --repo DIR   # run against another checkout (e.g. an older commit unpacked with git archive)

``rss`` starts ``python -m sdk serve --device cpu`` on a free port, waits for ``/health``, and reads
``VmRSS`` / ``RssAnon`` / ``RssFile`` from ``/proc/PID/status`` (three samples, 2-4 s after ready); with ``--burst N`` it then sends N
concurrent completions, samples the peak, waits for the engine to go idle and reads again.
``throughput`` sends N greedy requests at once to an in-process engine (bundled SmolLM2, fp32,
``max_sequence_length`` 512, batch up to 32) and reports aggregate tokens/s by wall time and the
process CPU seconds per generated token (robust when other jobs share the cores). ``prefix`` runs
multi-turn chats sharing a system prompt, one turn of every chat at a time, each turn's prompt
being the chat so far, and reports the engine's prefix-cache hit rate and time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The history of the printing press begins in the fifteenth century, when",
    "Here is a detailed recipe for a classic French onion soup. First,",
    "The three most important ideas in modern physics are",
    "Dear diary, today was the strangest day of my life because",
    "In computer science, a hash table is a data structure that",
    "The mountain trail wound upward through the pine forest, and the hikers",
    "Ten tips for learning a new language quickly: 1.",
]
SYSTEM = ("You are a helpful, concise assistant for a travel agency. Answer in two sentences at most, "
          "name concrete places, and never invent prices.")
QUESTIONS = ["Where should I go in Italy in spring?", "And what should I eat there?",
             "How do I get there from Paris?", "What is one museum worth a visit?",
             "Is it crowded in April?", "Thank you! One last tip?"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def status_mb(pid: int) -> dict[str, float]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) / 1024 for k in ("VmRSS", "VmHWM", "RssAnon",  # type: ignore[union-attr]
                                                                                  "RssFile")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 600) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # loopback only
        return json.loads(resp.read())


# ---------------------------------------------------------------------------------------------- rss
def bench_rss(repo: Path, burst: int, serve_args: list[str]) -> dict[str, Any]:
    for attempt in range(3):  # another process may take the free port before serve binds it
        try:
            return _bench_rss(repo, burst, serve_args)
        except RuntimeError as exc:
            if "bind" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _bench_rss(repo: Path, burst: int, serve_args: list[str]) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, "-m", "sdk", "serve", "--device", "cpu", "--port", str(port), "--log-level", "warning",
           *serve_args]
    proc = subprocess.Popen(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                http_json(f"{base}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() - started > 300:
                    raise
                time.sleep(0.5)
        ready_s = round(time.monotonic() - started, 1)
        samples = []
        for _ in range(3):  # 2, 3 and 4 s after /health first answers
            time.sleep(2 if not samples else 1)
            samples.append(status_mb(proc.pid))
        out: dict[str, Any] = {"command": " ".join(cmd[1:]), "idle": samples[-1],
                               "idle_VmRSS_samples": [round(s["VmRSS"], 1) for s in samples], "ready_s": ready_s}
        log(f"idle: {out['idle']} (VmRSS samples {out['idle_VmRSS_samples']})")
        if burst:
            peak = 0.0
            model = http_json(f"{base}/v1/models")["data"][0]["id"]

            def one(i: int) -> None:
                http_json(f"{base}/v1/completions", {"model": model, "prompt": PROMPTS[i % len(PROMPTS)] * 8,
                                                     "max_tokens": 64, "temperature": 0})

            async def run() -> None:
                nonlocal peak
                tasks = [asyncio.create_task(asyncio.to_thread(one, i)) for i in range(burst)]
                while not all(t.done() for t in tasks):
                    peak = max(peak, status_mb(proc.pid)["VmRSS"])
                    await asyncio.sleep(0.2)
                await asyncio.gather(*tasks)

            asyncio.run(run())
            out["burst"] = {"requests": burst, "peak_VmRSS": peak}
            time.sleep(6)  # the pool shrinks after 2 s idle
            out["idle_after_burst"] = status_mb(proc.pid)
            backend = http_json(f"{base}/health").get("backend", {})
            out["engine"] = {k: v for k, v in backend.items() if k.startswith(("kv_", "prefix_cache", "active", "queue"))}
            log(f"burst peak {peak:.0f} MB; idle after: {out['idle_after_burst']}")
        return out
    finally:
        proc.terminate()
        proc.wait(30)


# ------------------------------------------------------------------------------------- in-process
def load(repo: Path, dtype: str) -> Any:
    sys.path.insert(0, str(repo))
    from sdk.inference.loader import load_model

    return load_model(None, device="cpu", dtype=dtype, max_sequence_length=512)


def make_engine(loaded: Any, **fields: Any) -> Any:
    from sdk.inference import Engine, EngineConfig

    fields.setdefault("max_sequence_length", 512)
    fields.setdefault("warmup", False)
    return Engine.from_model(loaded.model, loaded.tokenizer, EngineConfig(**fields), metadata=loaded.metadata)


async def _burst(engine: Any, n: int, new_tokens: int) -> dict[str, Any]:
    from sdk.inference import GenerationRequest

    reqs = [GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)] + f" ({i})", max_new_tokens=new_tokens,
                              temperature=0.0) for i in range(n)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(engine.generate(r) for r in reqs))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    tokens = sum(len(r.token_ids) for r in results)
    return {"streams": n, "tokens": tokens, "seconds": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "cpu_ms_per_token": round(1000 * cpu / tokens, 2),
            "ttft_median_s": round(statistics.median(r.usage.time_to_first_token_s for r in results), 3)}


def bench_throughput(loaded: Any, concurrency: list[int], new_tokens: int, repeats: int) -> list[dict[str, Any]]:
    engine = make_engine(loaded, max_batch_size=max(concurrency), prefix_cache_tokens=0)
    try:
        asyncio.run(_burst(engine, 1, 4))  # warm-up
        out = []
        for n in concurrency:
            runs = [asyncio.run(_burst(engine, n, new_tokens)) for _ in range(repeats)]
            best = max(runs, key=lambda r: r["tokens_per_s"])
            best["cpu_ms_per_token"] = min(r["cpu_ms_per_token"] for r in runs)
            log(f"{n} streams: {best}")
            out.append(best)
        return out
    finally:
        engine.close()


def bench_prefix(loaded: Any, chats: int, turns: int, new_tokens: int) -> dict[str, Any]:
    from sdk.inference import GenerationRequest

    engine = make_engine(loaded, max_batch_size=8)
    histories = [[{"role": "system", "content": SYSTEM}] for _ in range(chats)]
    ttft: list[float] = []
    cached = prompt = 0

    async def turn(i: int, t: int) -> None:
        nonlocal cached, prompt
        history = histories[i]
        history.append({"role": "user", "content": f"{QUESTIONS[t % len(QUESTIONS)]} (chat {i})"})
        result = await engine.generate(GenerationRequest(messages=list(history), max_new_tokens=new_tokens,
                                                         temperature=0.0))
        history.append({"role": "assistant", "content": result.text})
        ttft.append(result.usage.time_to_first_token_s)
        cached += result.usage.cached_prompt_tokens
        prompt += result.usage.prompt_tokens

    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        for t in range(turns):
            asyncio.run(_gather(turn(i, t) for i in range(chats)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
        stats = engine.stats()
        out = {"chats": chats, "turns": turns, "prompt_tokens": prompt, "cached_prompt_tokens": cached,
               "seconds": round(wall, 2), "cpu_s": round(cpu, 2),
               "hit_rate": round(stats["prefix_cache_hit_rate"], 4),
               "ttft_median_s": round(statistics.median(ttft), 3),
               "engine": {k: v for k, v in stats.items() if k.startswith(("kv_", "prefix_cache"))}}
        log(f"prefix: {out}")
        return out
    finally:
        engine.close()


async def _gather(coros: Any) -> None:
    await asyncio.gather(*coros)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["rss", "throughput", "prefix", "all"])
    parser.add_argument("--repo", type=Path, default=ROOT, help="checkout to measure (default: this one)")
    parser.add_argument("--burst", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--chats", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path)
    args, serve_args = parser.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"]
    repo = args.repo.resolve()
    results: dict[str, Any] = {"repo": str(repo), "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    if args.what in ("rss", "all"):
        results["rss"] = bench_rss(repo, args.burst, serve_args)
    if args.what in ("throughput", "prefix", "all"):
        loaded = load(repo, args.dtype)
        if args.what in ("throughput", "all"):
            results["throughput"] = bench_throughput(loaded, args.concurrency, args.new_tokens, args.repeats)
        if args.what in ("prefix", "all"):
            results["prefix"] = bench_prefix(loaded, args.chats, args.turns, 24)
    results["load_average_after"] = os.getloadavg()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
