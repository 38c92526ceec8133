#!/usr/bin/env python3
"""Inference benchmark: our engine against calling ``model.generate`` directly, same model, same run.

    python3 bench/inference_bench.py                 # CPU, bundled SmolLM2, table
    python3 bench/inference_bench.py --json out.json # also write the figures

(1) single stream: tokens/s of one greedy request through the engine vs ``model.generate`` batch 1;
(2) concurrency: aggregate tokens/s of N requests sent at once to the engine vs the same N run one
after another with ``model.generate`` (plain batched ``generate`` shown for reference).
Greedy decoding on both sides, so the engine's token ids are also checked against ``generate``'s.
The GPU benchmark (``bench/gpu/``) reuses the measuring functions here.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

PROMPTS = [
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The history of the printing press begins in the fifteenth century, when",
    "Here is a detailed recipe for a classic French onion soup. First,",
    "The three most important ideas in modern physics are",
    "Dear diary, today was the strangest day of my life because",
    "In computer science, a hash table is a data structure that",
    "The mountain trail wound upward through the pine forest, and the hikers",
    "Ten tips for learning a new language quickly: 1.",
    "The city council met on Tuesday evening to discuss the new park, and",
    "Photosynthesis is the process by which plants",
]


def log(msg: str) -> None:
    """Progress line on stderr, flushed (the table goes to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    """Wait for queued device work so host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Run:
    """One timed case: generated tokens over wall seconds."""

    name: str
    requests: int
    tokens: int
    seconds: float
    ttft_s: float | None = None
    outputs: list[list[int]] = field(default_factory=list, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "requests": self.requests,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 4),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 4),
            **self.extra,
        }


def _generated(row: torch.Tensor, prompt_len: int, pad_id: int | None, eos_ids: set[int]) -> list[int]:
    out = row[prompt_len:].tolist()
    for i, tok in enumerate(out):  # generate pads finished rows; cut after the first EOS
        if tok in eos_ids:
            return out[: i + 1]
    return out


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """Every EOS id the model or tokenizer declares."""
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        v = getattr(src, "eos_token_id", None)
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


@torch.inference_mode()
def hf_generate(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    batched: bool,
    name: str = "",
) -> Run:
    """``model.generate`` greedy: one batch (left padded) or one call per prompt in turn."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = eos_ids(model, tokenizer)
    kwargs = dict(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
        temperature=None, top_p=None, top_k=None,
    )
    outputs: list[list[int]] = []
    sync(device)
    started = time.perf_counter()
    if batched:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        sync(device)
        outputs = [_generated(row, width, pad, eos) for row in out.cpu()]
    else:
        for p in prompts:
            ids = torch.tensor([p], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            outputs.append(_generated(out[0].cpu(), len(p), pad, eos))
        sync(device)
    seconds = time.perf_counter() - started
    label = name or f"generate {'batched' if batched else 'sequential'} x{len(prompts)}"
    return Run(label, len(prompts), sum(len(o) for o in outputs), seconds, outputs=outputs)


async def _engine_all(engine: Any, prompts: list[list[int]], max_new_tokens: int) -> list[Any]:
    from sdk.inference.types import GenerationRequest

    reqs = [
        GenerationRequest(prompt_token_ids=p, max_new_tokens=max_new_tokens, temperature=0.0) for p in prompts
    ]
    return await asyncio.gather(*(engine.generate(r) for r in reqs))


def engine_generate(engine: Any, prompts: list[list[int]], max_new_tokens: int, *, name: str = "") -> Run:
    """All ``prompts`` submitted to the engine at once (greedy); wall time until the last finishes."""
    sync(engine.device)
    started = time.perf_counter()
    results = asyncio.run(_engine_all(engine, prompts, max_new_tokens))
    sync(engine.device)
    seconds = time.perf_counter() - started
    outputs = [list(r.token_ids) for r in results]
    ttft = statistics.median(r.usage.time_to_first_token_s for r in results)
    label = name or f"engine concurrent x{len(prompts)}"
    return Run(label, len(prompts), sum(len(o) for o in outputs), seconds, ttft_s=ttft, outputs=outputs)


def agreement(a: Run, b: Run) -> float:
    """Share of requests whose generated token ids are identical in both runs."""
    same = sum(x == y for x, y in zip(a.outputs, b.outputs, strict=True))
    return same / max(1, len(a.outputs))


def device_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
        info["load_average"] = os.getloadavg()
    except (OSError, StopIteration):
        pass
    return info


def print_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    """A plain aligned text table on stdout."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    print(fmt.format(*header))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print(fmt.format(*r))
    sys.stdout.flush()


def tokenize_prompts(tokenizer: Any, n: int, offset: int = 0) -> list[list[int]]:
    """``n`` distinct prompts as token ids (cycled, numbered when repeated)."""
    out = []
    for i in range(n):
        text = PROMPTS[(offset + i) % len(PROMPTS)]
        if offset + i >= len(PROMPTS):
            text = f"({offset + i}) {text}"
        out.append(list(tokenizer(text)["input_ids"]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model-path", default=None, help="model dir or .gguf (default: bundled SmolLM2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="rounds over all cases (best of each kept)")
    parser.add_argument("--prefix-cache", action="store_true", help="keep the engine's prefix cache on")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", metavar="PATH", help="write results as JSON ('-' for stdout)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from sdk.inference.engine import Engine
    from sdk.inference.loader import load_model
    from sdk.inference.types import EngineConfig

    log("loading model")
    loaded = load_model(args.model_path, device=args.device, dtype=args.dtype)
    model, tok = loaded.model, loaded.tokenizer
    n, new = args.concurrency, args.max_new_tokens
    single = tokenize_prompts(tok, 1)
    many = tokenize_prompts(tok, n, offset=1)
    max_len = max(len(p) for p in single + many) + new + 8

    config = EngineConfig(
        device=args.device, dtype=args.dtype, max_sequence_length=max_len, max_batch_size=max(n, 1),
        prefix_cache_tokens=8192 if args.prefix_cache else 0, warmup=False,
    )
    # The engine routes attention through its slot cache; outside a step that is plain SDPA, so
    # model.generate keeps running unchanged and the cases can be interleaved (fairer under load).
    engine = Engine.from_model(model, tok, config)
    cases = {
        "hf_single": lambda: hf_generate(model, tok, single, new, batched=False, name="generate, batch 1"),
        "eng_single": lambda: engine_generate(engine, single, new, name="engine, 1 stream"),
        "hf_seq": lambda: hf_generate(model, tok, many, new, batched=False, name=f"generate, {n} sequential"),
        "hf_batch": lambda: hf_generate(
            model, tok, many, new, batched=True, name=f"generate, batch {n} (padded)"
        ),
        "eng_conc": lambda: engine_generate(engine, many, new, name=f"engine, {n} concurrent"),
    }
    best: dict[str, Run] = {}
    try:
        log("warm-up")
        hf_generate(model, tok, tokenize_prompts(tok, 2, offset=5), 8, batched=True)
        engine_generate(engine, tokenize_prompts(tok, 2, offset=5), 8)
        for rep in range(max(1, args.repeats)):
            for key, fn in cases.items():
                run = fn()
                log(f"round {rep + 1}: {run.name}: {run.tokens_per_s:.1f} tokens/s")
                if key not in best or run.tokens_per_s > best[key].tokens_per_s:
                    best[key] = run
        stats = engine.stats()
    finally:
        engine.close()
    hf_single, eng_single, hf_seq, hf_batch, eng_conc = (best[k] for k in cases)

    single_ratio = eng_single.tokens_per_s / hf_single.tokens_per_s
    conc_ratio = eng_conc.tokens_per_s / hf_seq.tokens_per_s
    rows = [
        (r.name, str(r.requests), str(r.tokens), f"{r.seconds:.2f}", f"{r.tokens_per_s:.1f}",
         "" if r.ttft_s is None else f"{r.ttft_s * 1000:.0f}")
        for r in (hf_single, eng_single, hf_seq, hf_batch, eng_conc)
    ]
    print(f"\n{loaded.name} on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')}), "
          f"{new} new tokens, greedy, torch threads {torch.get_num_threads()}")
    print_table(rows, ("case", "requests", "tokens", "seconds", "tokens/s", "ttft ms"))
    print(f"\nsingle stream: engine / generate = {single_ratio:.2f}x")
    print(f"{n} concurrent: engine / sequential generate = {conc_ratio:.2f}x; "
          f"engine / batched generate = {eng_conc.tokens_per_s / hf_batch.tokens_per_s:.2f}x")
    print(f"greedy agreement with generate: single {agreement(eng_single, hf_single):.0%}, "
          f"concurrent {agreement(eng_conc, hf_seq):.0%}")
    result = {
        "benchmark": "inference_bench",
        "model": loaded.name,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "max_new_tokens": new,
        "concurrency": n,
        "machine": device_info(loaded.device),
        "runs": [r.as_dict() for r in (hf_single, eng_single, hf_seq, hf_batch, eng_conc)],
        "single_stream_speedup": round(single_ratio, 3),
        "concurrent_vs_sequential_speedup": round(conc_ratio, 3),
        "concurrent_vs_batched_generate": round(eng_conc.tokens_per_s / hf_batch.tokens_per_s, 3),
        "greedy_agreement": {
            "single": agreement(eng_single, hf_single),
            "concurrent": agreement(eng_conc, hf_seq),
        },
        "engine_stats": stats,
    }
    if args.json == "-":
        print(json.dumps(result, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
