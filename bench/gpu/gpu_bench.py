#!/usr/bin/env python3
"""GPU benchmark: a random-initialised ~1B Llama (bf16) through plain ``generate`` and our engine.

    PYTHONPATH=. python3 bench/gpu/gpu_bench.py            # on the GPU machine (see run.sh)
    PYTHONPATH=. python3 bench/gpu/gpu_bench.py --smoke    # tiny model, any device: checks the script

Measures: device copy bandwidth; the batch-1 decode bound (weight bytes read per step / bandwidth);
plain ``model.generate`` at batch 1 and batched; our engine at each concurrency with and without
CUDA graphs; per engine, JSON-Schema constrained decoding at batch 1 and at the widest concurrency
(against the same width unconstrained; needs the grammar library, else recorded as skipped) and
the widest concurrency again from an idle, shrunk paged KV pool (the blocks grow during the timed
run; against the slot-cache figures of the last H200 run). Every case is caught on its own (one failure does not lose the others), results are
written to ``$OUT/gpu_bench.json`` after each case, and cases are skipped once the time budget runs out.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TOKENIZER_DIR = ROOT / "bench" / "assets" / "smollm2-tokenizer"
#: Modules the GPU image lacks; ``--forbid-imports`` makes them unimportable to prove we do not need them.
ABSENT_ON_GPU_IMAGE = ("nacl", "paho", "joserfc", "fastapi", "uvicorn", "sse_starlette", "gguf", "jsonschema",
                       "amqtt", "didkit", "openai", "typer_slim")
T0 = time.perf_counter()

#: The constrained-decoding case's schema: an enum, a bounded integer, an array of enums, a boolean,
#: then a free string, so the grammar is exercised structurally and the output runs the full length.
CONSTRAINED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "layout": {"enum": ["grid", "list", "carousel"]},
        "columns": {"type": "integer", "minimum": 1, "maximum": 6},
        "panels": {"type": "array", "items": {"enum": ["clock", "media", "map"]}, "minItems": 1, "maxItems": 3},
        "dark_mode": {"type": "boolean"},
        "note": {"type": "string"},
    },
    "required": ["layout", "columns", "panels", "dark_mode", "note"],
    "additionalProperties": False,
}
CONSTRAINED_FORMAT = {"type": "json_schema", "json_schema": {"name": "layout", "schema": CONSTRAINED_SCHEMA}}
#: 64 concurrent streams with the slot cache (before paged KV), H200, same model and shapes (INFERENCE.md).
SLOT_CACHE_C64_TOKENS_PER_S = {"engine": 2950.0, "engine_graphs": 12532.0}


def log(msg: str) -> None:
    """Progress, flushed (the device tool shows the tail of the output)."""
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


class _Forbid(importlib.abc.MetaPathFinder):
    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.split(".")[0] in self.names:
            raise ImportError(f"{fullname} is forbidden in this run (absent on the GPU image)")
        return None


def _config(smoke: bool) -> dict[str, Any]:
    if smoke:
        return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024,
                    tie_word_embeddings=True)
    # ~1.07B parameters with tied embeddings (the reference model).
    return dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=49152, max_position_embeddings=4096,
                tie_word_embeddings=True)


def build_model(smoke: bool, device: Any, dtype: Any) -> Any:
    """A random-initialised LlamaForCausalLM (seeded), on ``device`` in ``dtype``, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**_config(smoke), bos_token_id=1, eos_token_id=2, pad_token_id=2)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    if any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype=dtype)  # only if needed: a blanket cast would also cast RoPE's fp32 buffer
    model = model.to(device).eval()
    model.generation_config.eos_token_id = None  # random weights: decode the full length on the baseline
    return model


def load_tokenizer() -> Any:
    """The SmolLM2 tokenizer carried in bench/assets (AutoTokenizer, else the raw tokenizer.json)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - an older transformers may not know this tokenizer_config
        log(f"AutoTokenizer failed ({exc!r}); using PreTrainedTokenizerFast")
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(
            tokenizer_file=str(TOKENIZER_DIR / "tokenizer.json"),
            eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|im_start|>",
        )


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``n`` prompts of ``length`` random ordinary token ids (ids below 100 are specials: avoided)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n, length), generator=g).tolist()


def copy_bandwidth(device: Any, smoke: bool) -> dict[str, Any]:
    """Device-to-device copy rate, counting bytes read plus written (median of timed copies)."""
    import torch

    nbytes = (64 << 20) if smoke else (2 << 30)
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(5 if smoke else 20):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
    assert torch.equal(dst, src)
    sec = statistics.median(times)
    del src, dst
    return {"bytes_copied": nbytes, "seconds": sec, "bytes_per_s": 2 * nbytes / sec}


class Budget:
    """Wall-clock budget for the whole run; a case runs only if its estimate still fits."""

    def __init__(self, seconds: float) -> None:
        self.deadline = T0 + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, short prompts: checks the script")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--concurrency", default=None, help="comma list (default 1,8,32,64; smoke 1,4)")
    parser.add_argument("--prompt-tokens", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting cases after this")
    parser.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph engine cases")
    parser.add_argument("--forbid-imports", action="store_true",
                        help="make packages absent from the GPU image unimportable (for local checks)")
    parser.add_argument("--out", default=None, help="JSON path (default $OUT/gpu_bench.json if $OUT is set)")
    args = parser.parse_args(argv)
    if args.forbid_imports:
        sys.meta_path.insert(0, _Forbid(ABSENT_ON_GPU_IMAGE))

    import torch
    import transformers
    from inference_bench import Run, agreement, engine_generate, hf_generate

    smoke = args.smoke
    conc = [int(c) for c in (args.concurrency or ("1,4" if smoke else "1,8,32,64")).split(",")]
    prompt_len = args.prompt_tokens or (16 if smoke else 128)
    new = args.new_tokens or (8 if smoke else 128)
    budget = Budget(args.budget_s)
    out_path = Path(args.out) if args.out else None
    if out_path is None and os.environ.get("OUT"):
        out_path = Path(os.environ["OUT"]) / "gpu_bench.json"
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict[str, Any] = {
        "benchmark": "gpu_bench",
        "smoke": smoke,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": sys.version.split()[0],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": prompt_len,
        "new_tokens": new,
        "concurrency": conc,
        "cases": {},
        "errors": {},
        "skipped": [],
    }

    def save() -> None:
        results["elapsed_s"] = round(time.perf_counter() - T0, 1)
        if out_path is not None:
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(results, indent=2, default=str))

    def case(name: str, fn: Any, estimate_s: float = 0.0, *, record: bool = True) -> Any:
        """Run one case, record its result or its error; skip it if the budget cannot cover it."""
        if budget.left() < estimate_s:
            log(f"SKIP {name}: {budget.left():.0f}s left, needs ~{estimate_s:.0f}s")
            results["skipped"].append(name)
            save()
            return None
        log(f"case {name} ...")
        started = time.perf_counter()
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - each case is caught on its own
            log(f"FAILED {name}: {exc!r}")
            results["errors"][name] = {"error": repr(exc), "traceback": traceback.format_exc()[-3000:]}
            if device.type == "cuda":
                try:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                except Exception as sync_exc:  # noqa: BLE001 - a broken CUDA context: later cases will fail fast too
                    log(f"CUDA unusable after {name}: {sync_exc!r}")
            save()
            return None
        took = time.perf_counter() - started
        if isinstance(value, Run):
            results["cases"][name] = {**value.as_dict(), "case_seconds": round(took, 2)}
            log(f"  {name}: {value.tokens} tokens in {value.seconds:.2f}s "
                f"= {value.tokens_per_s:.1f} tokens/s")
        elif value is not None and record:
            results["cases"][name] = value
            log(f"  {name}: {value}")
        else:
            results["cases"][name] = {"case_seconds": round(took, 2)}
            log(f"  {name}: done in {took:.1f}s")
        save()
        return value

    log(f"torch {torch.__version__}, transformers {transformers.__version__}, device {results['device']}")
    case("import_engine", lambda: {"module": importlib.import_module("sdk.inference.engine").__name__})
    bw = case("copy_bandwidth", lambda: copy_bandwidth(device, smoke))
    tok = load_tokenizer()
    vocab = _config(smoke)["vocab_size"]
    if len(tok) != vocab:
        log(f"note: tokenizer has {len(tok)} tokens, model vocab {vocab}")
    model = case("build_model", lambda: build_model(smoke, device, dtype), record=False)
    if model is None:
        print_summary(results)
        return 1
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results["parameters"] = params
    results["weight_bytes"] = weight_bytes
    if bw:
        results["batch1_bound_tokens_per_s"] = bw["bytes_per_s"] / weight_bytes
    log(f"model: {params / 1e9:.3f}B parameters, {weight_bytes / 1e9:.2f} GB of weights")

    max_c = max(conc)
    prompts = random_prompts(max_c, prompt_len, vocab, seed=1)
    warm = random_prompts(max_c, prompt_len, vocab, seed=2)

    # ---- plain model.generate (before the engine touches the model's attention)
    case("generate_warmup", lambda: hf_generate(model, tok, warm[:2], 4, batched=True))
    prefill = case("generate_b1_prefill", lambda: hf_generate(model, tok, prompts[:1], 1, batched=False), 5)
    b1 = case("generate_b1", lambda: hf_generate(model, tok, prompts[:1], new, batched=False,
                                                 name="generate, batch 1"), 10)
    if b1 is not None and prefill is not None and b1.seconds > prefill.seconds:
        results["generate_b1_decode_tokens_per_s"] = (b1.tokens - 1) / (b1.seconds - prefill.seconds)
    for c in conc:
        if c > 1:
            case(f"generate_batch{c}", lambda c=c: hf_generate(model, tok, prompts[:c], new, batched=True,
                                                               name=f"generate, batch {c}"), 15)

    # ---- our engine, without and with CUDA graphs
    from sdk.inference.engine import Engine
    from sdk.inference.types import EngineConfig

    modes = [False] if (args.no_graphs or device.type != "cuda") else [False, True]
    for graphs in modes:
        tag = "engine_graphs" if graphs else "engine"

        def start(graphs: bool = graphs) -> Any:
            cfg = EngineConfig(device=str(device), dtype=str(dtype).removeprefix("torch."),
                               max_sequence_length=prompt_len + new + 8, max_batch_size=max_c,
                               prefix_cache_tokens=0, cuda_graphs=graphs, warmup=False,
                               max_queue_size=4 * max_c)
            return Engine.from_model(model, tok, cfg)

        engine = case(f"{tag}_start", start, 20, record=False)
        if engine is None:
            continue
        try:
            results["cases"][f"{tag}_plan"] = engine.plan.as_dict()
            for c in conc:
                # Warm-up at this width, timed apart from the run; with graphs it runs the full length
                # so every (batch, KV-length) bucket the timed run meets is captured here.
                warm_new = new if graphs else 8
                case(f"{tag}_warmup_c{c}",
                     lambda c=c, w=warm_new, e=engine: engine_generate(e, warm[:c], w, name=f"warm-up x{c}"), 20)
                run = case(f"{tag}_c{c}", lambda c=c, e=engine, g=graphs: _engine_case(e, prompts[:c], new, g), 30)
                if run is not None and c == 1 and b1 is not None:
                    results["cases"][f"{tag}_c1"]["matches_generate"] = agreement(run, b1)
            if _grammar_library():
                for c in sorted({1, max_c}):
                    case(f"{tag}_constrained_warmup_c{c}",
                         lambda c=c, e=engine, g=graphs: _constrained_case(e, tok, warm[:c], 8, g), 20)
                    case(f"{tag}_constrained_c{c}",
                         lambda c=c, e=engine, g=graphs: _constrained_case(e, tok, prompts[:c], new, g), 30)
            else:
                log(f"SKIP {tag}_constrained: the grammar library (llguidance) is not installed")
                results["skipped"].append(f"{tag}_constrained (no llguidance)")
            case(f"{tag}_paged_cold_c{max_c}",
                 lambda e=engine, g=graphs: _paged_cold_case(e, prompts[:max_c], new, g), 40)
        finally:
            try:
                engine.close()
            except Exception as exc:  # noqa: BLE001 - the results matter more than the close
                log(f"closing the engine failed: {exc!r}")

    # ---- summary
    summarize(results, conc)
    save()
    print_summary(results)
    if out_path is not None:
        log(f"wrote {out_path}")
    return 0


def _engine_case(engine: Any, prompts: list[list[int]], new: int, graphs: bool) -> Any:
    from inference_bench import engine_generate

    name = f"engine{' +graphs' if graphs else ''}, {len(prompts)} concurrent"
    run = engine_generate(engine, prompts, new, name=name)
    run.extra["stats"] = {k: v for k, v in engine.stats().items() if isinstance(v, (int, float))}
    return run


def _grammar_library() -> bool:
    try:
        importlib.import_module("llguidance")
    except ImportError:
        return False
    return True


def _constrained_case(engine: Any, tok: Any, prompts: list[list[int]], new: int, graphs: bool) -> Any:
    """All ``prompts`` at once under :data:`CONSTRAINED_FORMAT` (greedy); each output is parsed as
    JSON and checked against the schema's enums and bounds (jsonschema is absent on the GPU image)."""
    import asyncio

    from inference_bench import Run, sync

    from sdk.inference.types import GenerationRequest

    reqs = [GenerationRequest(prompt_token_ids=p, max_new_tokens=new, temperature=0.0,
                              response_format=CONSTRAINED_FORMAT) for p in prompts]

    async def run_all() -> list[Any]:
        return await asyncio.gather(*(engine.generate(r) for r in reqs))

    sync(engine.device)
    started = time.perf_counter()
    done = asyncio.run(run_all())
    sync(engine.device)
    seconds = time.perf_counter() - started
    finished = [r for r in done if r.finish_reason == "stop"]
    valid = sum(_layout_ok(r.text) for r in finished)
    run = Run(f"engine{' +graphs' if graphs else ''}, {len(prompts)} constrained", len(prompts),
              sum(len(r.token_ids) for r in done), seconds,
              ttft_s=statistics.median(r.usage.time_to_first_token_s for r in done),
              outputs=[list(r.token_ids) for r in done])
    prefixes_ok = sum(_layout_prefix_ok(r.text) for r in done if r.finish_reason == "length")
    run.extra.update({"finished": len(finished), "finished_valid": valid, "cut_at_length": len(done) - len(finished),
                      "cut_prefix_valid": prefixes_ok})
    return run


def _layout_ok(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    props: dict[str, Any] = CONSTRAINED_SCHEMA["properties"]
    return (isinstance(value, dict) and set(value) == set(props) and value["layout"] in props["layout"]["enum"]
            and type(value["columns"]) is int and 1 <= value["columns"] <= 6
            and isinstance(value["panels"], list) and 1 <= len(value["panels"]) <= 3
            and all(p in ("clock", "media", "map") for p in value["panels"])
            and type(value["dark_mode"]) is bool and isinstance(value["note"], str))


def _layout_prefix_ok(text: str) -> bool:
    """An output cut at the length limit: every field before the free ``note`` string is valid."""
    head, sep, _ = text.partition(',"note":"')
    return bool(sep) and _layout_ok(head + ',"note":""}')


def _paged_cold_case(engine: Any, prompts: list[list[int]], new: int, graphs: bool) -> Any:
    """``prompts`` at once after the paged KV pool shrank back while idle: the timed run includes
    growing it again; the pool's figures before and after are recorded."""
    from inference_bench import engine_generate

    grown = engine.stats().get("kv_blocks", 0)
    deadline = time.perf_counter() + engine.config.kv_idle_shrink_s + 3.0  # at its floor it never shrinks
    while time.perf_counter() < deadline and engine.stats().get("kv_blocks", 0) >= grown > 0:
        time.sleep(0.25)
    before = {k: v for k, v in engine.stats().items() if k.startswith("kv_")}
    run = engine_generate(engine, prompts, new, name=f"engine{' +graphs' if graphs else ''}, "
                                                     f"{len(prompts)} concurrent from an idle pool")
    after = {k: v for k, v in engine.stats().items() if k.startswith("kv_")}
    run.extra.update({"kv_blocks_grown_from": grown, "shrank": before.get("kv_blocks", 0) < grown, "kv_before": before, "kv_after": after,
                      "preemptions": after.get("kv_preemptions", 0) - before.get("kv_preemptions", 0)})
    return run


def summarize(results: dict[str, Any], conc: list[int]) -> None:
    """Ratios against the bandwidth bound and against sequential / batched generate."""
    cases = results["cases"]
    bound = results.get("batch1_bound_tokens_per_s")
    seq = cases.get("generate_b1", {}).get("tokens_per_s")
    summary: dict[str, Any] = {}
    for tag in ("engine", "engine_graphs"):
        one = cases.get(f"{tag}_c1")
        if one and bound:
            # Single stream: per-token decode rate (after the first token) against the bound.
            decode = (one["tokens"] - 1) / max(one["seconds"] - (one.get("ttft_s") or 0.0), 1e-9)
            summary[f"{tag}_b1_decode_tokens_per_s"] = decode
            summary[f"{tag}_b1_decode_share_of_bound"] = decode / bound
        for c in conc:
            run = cases.get(f"{tag}_c{c}")
            if not run:
                continue
            if seq:
                summary[f"{tag}_c{c}_vs_sequential"] = run["tokens_per_s"] / seq
            if one and c > 1:
                summary[f"{tag}_c{c}_vs_own_single_stream"] = run["tokens_per_s"] / one["tokens_per_s"]
            plain = cases.get(f"generate_batch{c}", {}).get("tokens_per_s")
            if plain:
                summary[f"{tag}_c{c}_vs_batched_generate"] = run["tokens_per_s"] / plain
            constrained = cases.get(f"{tag}_constrained_c{c}")
            if constrained:  # the target: constrained costs <= 10 % of unconstrained tokens/s
                summary[f"{tag}_constrained_c{c}_vs_unconstrained"] = constrained["tokens_per_s"] / run["tokens_per_s"]
        cold = cases.get(f"{tag}_paged_cold_c{max(conc)}")
        if cold and max(conc) == 64:
            summary[f"{tag}_paged_cold_c64_vs_slot_cache"] = cold["tokens_per_s"] / SLOT_CACHE_C64_TOKENS_PER_S[tag]
            warm = cases.get(f"{tag}_c64")
            if warm:
                summary[f"{tag}_paged_c64_vs_slot_cache"] = warm["tokens_per_s"] / SLOT_CACHE_C64_TOKENS_PER_S[tag]
    g1 = results.get("generate_b1_decode_tokens_per_s")
    if g1 and bound:
        summary["generate_b1_decode_share_of_bound"] = g1 / bound
    results["summary"] = summary


def print_summary(results: dict[str, Any]) -> None:
    """The final table (the tail of the output is what the device tool returns)."""
    from inference_bench import print_table

    cases = results["cases"]
    rows = []
    for name, c in cases.items():
        if isinstance(c, dict) and "tokens_per_s" in c and "warmup" not in name:
            ttft = "" if c.get("ttft_s") is None else f"{c['ttft_s'] * 1000:.0f}"
            rows.append((name, str(c["requests"]), str(c["tokens"]), f"{c['seconds']:.2f}",
                         f"{c['tokens_per_s']:.1f}", ttft))
    print(f"\n== {results['device']} ({results['dtype']}), torch {results['torch']}, transformers "
          f"{results['transformers']}, {results.get('parameters', 0) / 1e9:.3f}B params, "
          f"{results['prompt_tokens']}-token prompts, {results['new_tokens']} new tokens")
    bw = cases.get("copy_bandwidth")
    if bw:
        print(f"copy bandwidth {bw['bytes_per_s'] / 1e12:.2f} TB/s; batch-1 bound "
              f"{results.get('batch1_bound_tokens_per_s', 0):.0f} tokens/s")
    if rows:
        print_table(rows, ("case", "requests", "tokens", "seconds", "tokens/s", "ttft ms"))
    for k, v in results.get("summary", {}).items():
        print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
    for k, v in results["errors"].items():
        print(f"ERROR {k}: {v['error'][:300]}")
    if results["skipped"]:
        print(f"skipped (time budget): {', '.join(results['skipped'])}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
