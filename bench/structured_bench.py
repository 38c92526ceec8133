#!/usr/bin/env python3
"""Structured-output benchmark: constrained vs unconstrained decoding on the same engine.

    python3 bench/structured_bench.py                    # CPU, bundled SmolLM2, table
    python3 bench/structured_bench.py --json out.json    # also write the figures
    python3 bench/structured_bench.py --libraries        # + llguidance vs xgrammar (if installed)

Batch 1 and batch 8, the same prompt and the same number of new tokens (every request runs to
``max_new_tokens``): unconstrained greedy counting, and the same prompt constrained to a JSON
array of integers (the grammar keeps it going to the length limit). Rounds alternate between
the two so load from other processes hits both alike; the figures are medians over rounds of
aggregate tokens/s (wall) and of process CPU seconds per token (all threads, the grammar
thread included), the second being the one to trust on a shared machine. The grammar thread's
own CPU time per constrained row-step is reported apart, and a nested, enum-heavy schema is run
for a realistic per-token rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "Count from 1 to 1000: 1, 2, 3,"
ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 1000000}}
LAYOUT = {
    "type": "object",
    "properties": {
        "layout": {"enum": ["grid", "list", "carousel"]},
        "font_scale": {"type": "number", "minimum": 0.5, "maximum": 3},
        "columns": {"type": "integer", "minimum": 1, "maximum": 6},
        "panels": {"type": "array", "maxItems": 4, "items": {
            "type": "object", "properties": {"id": {"enum": ["clock", "media", "map", "news"]},
                                             "size": {"enum": ["s", "m", "l"]},
                                             "title": {"type": "string", "maxLength": 24}},
            "required": ["id", "size", "title"], "additionalProperties": False}},
        "dark_mode": {"type": "boolean"},
    },
    "required": ["layout", "font_scale", "columns", "panels", "dark_mode"],
    "additionalProperties": False,
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}


class Meter:
    """Instruments one engine: CPU time of the scheduler's worker thread in its prefill/decode
    steps, CPU time of the grammar thread per constrained row, and how long the worker waited
    for masks (the part of mask filling the forward pass did not hide)."""

    def __init__(self, scheduler: Any) -> None:
        self.reset()
        filler = scheduler.mask_filler
        fill, masks = filler.fill, scheduler._masks
        prefill, decode = scheduler._prefill, scheduler._decode

        def timed_fill(matchers: Any) -> Any:
            started = time.thread_time()
            out = fill(matchers)
            self.grammar_s += time.thread_time() - started
            self.rows += len(matchers)
            return out

        def timed_masks(pending: Any) -> Any:
            started = time.perf_counter()
            out = masks(pending)
            self.wait_s += time.perf_counter() - started
            return out

        def timed(step: Any) -> Any:
            def run() -> Any:
                started = time.thread_time()
                try:
                    return step()
                finally:
                    self.worker_s += time.thread_time() - started
            return run

        filler.fill, scheduler._masks = timed_fill, timed_masks
        scheduler._prefill, scheduler._decode = timed(prefill), timed(decode)

    def reset(self) -> None:
        self.grammar_s = self.worker_s = self.wait_s = 0.0
        self.rows = 0


async def _batch(engine: Any, meter: Meter, n: int, tokens: int, response_format: dict[str, Any] | None,
                 prompt: str = PROMPT) -> dict[str, float]:
    from sdk.inference import GenerationRequest

    reqs = [GenerationRequest(prompt=prompt, max_new_tokens=tokens, temperature=0.0, response_format=response_format)
            for _ in range(n)]
    meter.reset()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    results = await asyncio.gather(*(engine.generate(r) for r in reqs))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    produced = sum(len(r.token_ids) for r in results)
    if response_format is not None:
        for r in results:
            if r.finish_reason == "stop":
                json.loads(r.text)  # a finished constrained output is valid JSON
    return {"tokens": produced, "wall_s": wall, "tok_s": produced / wall,
            "cpu_ms_per_token": cpu / produced * 1e3,
            "step_cpu_ms_per_token": (meter.worker_s + meter.grammar_s) / produced * 1e3,
            "grammar_us_per_row": meter.grammar_s / meter.rows * 1e6 if meter.rows else 0.0,
            "mask_wait_us_per_token": meter.wait_s / produced * 1e6}


async def measure(engine: Any, *, rounds: int, tokens: int) -> dict[str, Any]:
    await engine.grammar_compiler()
    meter = Meter(engine._scheduler)
    await _batch(engine, meter, 1, 4, _format(ARRAY))  # compile + warm
    out: dict[str, Any] = {}
    fields = ("tok_s", "cpu_ms_per_token", "step_cpu_ms_per_token", "grammar_us_per_row", "mask_wait_us_per_token",
              "tokens")
    for batch in (1, 8):
        runs: dict[str, list[dict[str, float]]] = {"unconstrained": [], "constrained": []}
        for i in range(rounds):
            order = [None, _format(ARRAY)] if i % 2 == 0 else [_format(ARRAY), None]
            for fmt in order:
                run = await _batch(engine, meter, batch, tokens, fmt)
                runs["unconstrained" if fmt is None else "constrained"].append(run)
        med = {k: {m: statistics.median(r[m] for r in rs) for m in fields} for k, rs in runs.items()}
        free, cons = med["unconstrained"], med["constrained"]
        case = {**med,
                "overhead_tok_s_pct": 100 * (1 - cons["tok_s"] / free["tok_s"]),
                "overhead_step_cpu_pct": 100 * (cons["step_cpu_ms_per_token"] / free["step_cpu_ms_per_token"] - 1)}
        out[f"batch{batch}"] = case
        log(f"batch {batch}: {json.dumps(case)}")
    layout = await _batch(engine, meter, 8, 160, _format(LAYOUT), prompt="Describe a home-screen layout as JSON:")
    out["layout_batch8"] = layout
    return out


def apply_cost(vocab: int) -> dict[str, float]:
    """Microseconds to apply a bitmask to a logits batch (the worker-thread part)."""
    import torch

    from sdk.inference.sampling import apply_token_bitmask

    res = {}
    for batch in (1, 8):
        logits = torch.randn(batch, vocab)
        mask = torch.randint(-(1 << 31), (1 << 31) - 1, (batch, (vocab + 31) // 32), dtype=torch.int32)
        apply_token_bitmask(logits, mask)
        n = 200
        started = time.thread_time()
        for _ in range(n):
            apply_token_bitmask(logits, mask)
        res[f"apply_us_batch{batch}"] = (time.thread_time() - started) / n * 1e6
    return res


# ------------------------------------------------------------------ library comparison

COMPARE = {
    "flat": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
             "required": ["name", "age"]},
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer"}, "tags": {
            "type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}}}, "required": ["id", "tags"]},
        "score": {"type": "number"}, "ok": {"type": "boolean"}}, "required": ["user", "score", "ok"]},
    "layout": LAYOUT,
}
INSTANCES = {
    "flat": {"name": "Ann", "age": 31},
    "nested": {"user": {"id": 7, "tags": ["a", "b"]}, "score": 1.5, "ok": True},
    "layout": {"layout": "grid", "font_scale": 1.25, "columns": 3, "panels": [
        {"id": "clock", "size": "s", "title": "Time"}, {"id": "map", "size": "l", "title": "Where"}],
        "dark_mode": False},
}


def _site_size(*names: str) -> float:
    import importlib.util

    total = 0
    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            total += sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())
    return total / 2**20


def compare_libraries(tokenizer: Any, vocab: int, steps: int = 3) -> dict[str, Any]:
    """Tokenizer set-up, compile time and per-step mask cost (process CPU) of both libraries, fed
    the same token path (each instance's compact JSON, tokenized)."""
    import torch

    out: dict[str, Any] = {}
    paths = {k: tokenizer(json.dumps(v, separators=(",", ":")), add_special_tokens=False)["input_ids"]
             for k, v in INSTANCES.items()}
    import llguidance
    import llguidance.hf

    t = time.process_time()
    lt = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    res: dict[str, Any] = {"tokenizer_s": time.process_time() - t, "install_mb": _site_size("llguidance"),
                           "extra_deps": []}
    ex = llguidance.LLExecutor(num_threads=2)
    for name, schema in COMPARE.items():
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        t = time.process_time()
        llguidance.LLMatcher(lt, grammar, log_level=0)
        res[f"{name}_compile_ms"] = (time.process_time() - t) * 1e3
        for batch in (1, 8):
            per = []
            for _ in range(steps):
                ms = [llguidance.LLMatcher(lt, grammar, log_level=0) for _ in range(batch)]
                mask = torch.full((batch, (vocab + 31) // 32), -1, dtype=torch.int32)
                t = time.process_time()
                for tid in paths[name]:
                    ex.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(ms)], mask.data_ptr(), mask.shape[1] * 4,
                                               batch)
                    for m in ms:
                        m.consume_token(tid)
                per.append((time.process_time() - t) / len(paths[name]) * 1e6)
            res[f"{name}_batch{batch}_us_per_step"] = min(per)
    out["llguidance"] = res
    try:
        import xgrammar as xgr
    except ImportError:
        out["xgrammar"] = "not installed"
        return out
    t = time.process_time()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    res = {"tokenizer_s": time.process_time() - t, "install_mb": _site_size("xgrammar", "tvm_ffi", "triton"),
           "extra_deps": ["apache-tvm-ffi", "triton (Linux x86_64)", "pydantic", "numpy"]}
    compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    for name, schema in COMPARE.items():
        t = time.process_time()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))
        res[f"{name}_compile_ms"] = (time.process_time() - t) * 1e3
        for batch in (1, 8):
            per = []
            for _ in range(steps):
                ms = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
                mask = xgr.allocate_token_bitmask(batch, vocab)
                t = time.process_time()
                for tid in paths[name]:
                    for i, m in enumerate(ms):
                        m.fill_next_token_bitmask(mask, i)
                    for m in ms:
                        m.accept_token(tid)
                per.append((time.process_time() - t) / len(paths[name]) * 1e6)
            res[f"{name}_batch{batch}_us_per_step"] = min(per)
    out["xgrammar"] = res
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: the bundled SmolLM2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the forward runs on the worker thread, so its CPU time is the step's)")
    parser.add_argument("--libraries", action="store_true", help="also compare llguidance and xgrammar")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    import torch

    from sdk.inference import Engine, EngineConfig
    from sdk.inference.loader import load_model

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, max_sequence_length=512)
    vocab = int(loaded.model.get_output_embeddings().weight.shape[0])
    figures: dict[str, Any] = {"device": args.device, "dtype": args.dtype, "torch_threads": torch.get_num_threads(),
                               "tokens": args.tokens, "rounds": args.rounds}
    if args.libraries:
        figures["libraries"] = compare_libraries(loaded.tokenizer, vocab)
        log(json.dumps(figures["libraries"], indent=1))
    figures["apply"] = apply_cost(vocab)

    async def run() -> dict[str, Any]:
        engine = Engine.from_model(loaded.model, loaded.tokenizer,
                                   EngineConfig(max_sequence_length=512, max_batch_size=8, warmup=False))
        try:
            await engine.warmup()
            return await measure(engine, rounds=args.rounds, tokens=args.tokens)
        finally:
            await engine.aclose()

    figures.update(asyncio.run(run()))
    print(f"{'case':<8} {'free tok/s':>10} {'json tok/s':>10} {'wall ovh':>9} {'free step CPU':>14} "
          f"{'json step CPU':>14} {'CPU ovh':>8} {'grammar µs/row':>15} {'mask wait µs/tok':>17}")
    for b in ("batch1", "batch8"):
        c = figures[b]
        free, cons = c["unconstrained"], c["constrained"]
        print(f"{b:<8} {free['tok_s']:>10.1f} {cons['tok_s']:>10.1f} {c['overhead_tok_s_pct']:>8.1f}% "
              f"{free['step_cpu_ms_per_token']:>11.2f} ms {cons['step_cpu_ms_per_token']:>11.2f} ms "
              f"{c['overhead_step_cpu_pct']:>7.1f}% {cons['grammar_us_per_row']:>15.1f} "
              f"{cons['mask_wait_us_per_token']:>17.1f}")
    lay = figures["layout_batch8"]
    print(f"layout schema, batch 8: {lay['tok_s']:.1f} tok/s, step CPU {lay['step_cpu_ms_per_token']:.2f} ms/token, "
          f"grammar {lay['grammar_us_per_row']:.1f} µs/row, mask wait {lay['mask_wait_us_per_token']:.1f} µs/token")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
