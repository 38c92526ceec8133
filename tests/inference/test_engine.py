"""The engine on the real SmolLM2 (CPU, fp32): correctness of batching, streaming, sampling, limits."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from sdk.inference import (
    EngineClosed,
    EngineOverloaded,
    GenerationRequest,
    InvalidRequest,
    PromptTooLong,
)

pytestmark = [pytest.mark.model]

PROMPTS = [
    "The capital of France is",
    "Water boils at a temperature of",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "The three primary colors are",
    "Python is a programming language that",
]


def greedy(prompt: str | None = None, n: int = 12, **kw: Any) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_new_tokens=n, temperature=0.0, **kw)


async def test_capital_of_france(smollm2_engine: Any) -> None:
    result = await smollm2_engine.generate(greedy("The capital of France is", 8))
    assert "Paris" in result.text
    assert result.finish_reason == "length"
    assert result.usage.completion_tokens == len(result.token_ids) == 8
    assert result.usage.prompt_tokens == 5
    assert result.usage.time_to_first_token_s > 0


async def test_matches_transformers_generate(smollm2: Any, smollm2_engine: Any) -> None:
    import torch

    tok = smollm2.tokenizer
    ids = tok(PROMPTS[3], return_tensors="pt")
    with torch.inference_mode():
        out = smollm2.model.generate(**ids, max_new_tokens=10, do_sample=False)
    ref = out[0, ids.input_ids.shape[1] :].tolist()
    result = await smollm2_engine.generate(greedy(PROMPTS[3], 10))
    assert result.token_ids == ref


async def test_greedy_is_deterministic(smollm2_engine: Any) -> None:
    first = await smollm2_engine.generate(greedy(PROMPTS[1]))
    second = await smollm2_engine.generate(greedy(PROMPTS[1]))
    assert first.token_ids == second.token_ids and first.text == second.text


async def test_stream_equals_generate(smollm2: Any, smollm2_engine: Any) -> None:
    chunks = [c async for c in smollm2_engine.stream(greedy(PROMPTS[2], 16))]
    result = await smollm2_engine.generate(greedy(PROMPTS[2], 16))
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "length" and chunks[-1].usage is not None
    assert "".join(c.text for c in chunks) == result.text
    assert [t for c in chunks for t in c.token_ids] == result.token_ids
    assert result.text == smollm2.tokenizer.decode(result.token_ids, skip_special_tokens=True)


async def test_concurrent_requests_match_sequential(smollm2_engine: Any) -> None:
    sequential = [await smollm2_engine.generate(greedy(p, 10)) for p in PROMPTS]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, smollm2_engine.stats()["active_streams"])
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    concurrent = await asyncio.gather(*(smollm2_engine.generate(greedy(p, 10)) for p in PROMPTS))
    watcher.cancel()
    assert [r.token_ids for r in concurrent] == [r.token_ids for r in sequential]
    assert [r.text for r in concurrent] == [r.text for r in sequential]
    assert peak > 1  # they really shared decode steps


async def _wait_idle(engine: Any) -> None:
    for _ in range(500):
        if engine.stats()["active_streams"] == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"slots not freed: {engine.stats()}")


async def test_closing_the_stream_frees_the_slot(smollm2_engine: Any) -> None:
    stream = smollm2_engine.stream(greedy(PROMPTS[3], 400))
    got = [await stream.__anext__(), await stream.__anext__()]
    assert smollm2_engine.stats()["active_streams"] == 1
    await stream.aclose()
    await _wait_idle(smollm2_engine)
    assert len(got) == 2


async def test_cancelling_the_consumer_task_frees_the_slot(smollm2_engine: Any) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in smollm2_engine.stream(greedy(PROMPTS[3], 400)):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await _wait_idle(smollm2_engine)


async def test_cancel_by_request_id_ends_with_cancelled(smollm2_engine: Any) -> None:
    chunks = []
    async for chunk in smollm2_engine.stream(greedy(PROMPTS[3], 400, request_id="to-cancel")):
        chunks.append(chunk)
        if len(chunks) == 2:
            assert smollm2_engine.cancel("to-cancel")
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens < 400
    await _wait_idle(smollm2_engine)


async def test_prompt_too_long_and_max_new_tokens_clipped(make_engine: Any) -> None:
    engine = make_engine(max_sequence_length=24, max_batch_size=1)
    with pytest.raises(PromptTooLong) as err:
        await engine.generate(greedy("word " * 40))
    assert err.value.reason == "prompt_too_long"
    result = await engine.generate(greedy(PROMPTS[3], 100))  # 19-token prompt: room for 5
    assert result.finish_reason == "length"
    assert result.usage.prompt_tokens + result.usage.completion_tokens == 24


async def test_stop_string_ends_before_the_match(smollm2_engine: Any) -> None:
    full = await smollm2_engine.generate(greedy(PROMPTS[3], 20))
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    cut = full.text.index(stop)
    result = await smollm2_engine.generate(greedy(PROMPTS[3], 20, stop=["never-appears", stop]))
    assert result.finish_reason == "stop"
    assert result.text == full.text[:cut]
    assert stop not in result.text
    chunks = [c async for c in smollm2_engine.stream(greedy(PROMPTS[3], 20, stop=[stop]))]
    assert "".join(c.text for c in chunks) == result.text


async def test_seed_reproducibility(smollm2_engine: Any) -> None:
    def req(seed: int) -> GenerationRequest:
        return GenerationRequest(
            prompt=PROMPTS[4], max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50, seed=seed
        )

    a = await smollm2_engine.generate(req(7))
    b = await smollm2_engine.generate(req(7))
    assert a.token_ids == b.token_ids
    others = await asyncio.gather(*(smollm2_engine.generate(req(s)) for s in (1, 2, 3)))
    assert any(o.token_ids != a.token_ids for o in others)
    concurrent = await asyncio.gather(smollm2_engine.generate(req(7)), smollm2_engine.generate(req(8)))
    assert concurrent[0].token_ids == a.token_ids


async def test_resume_from_prompt_token_ids(smollm2: Any, smollm2_engine: Any) -> None:
    prompt_ids = smollm2.tokenizer(PROMPTS[0])["input_ids"]
    full = await smollm2_engine.generate(
        GenerationRequest(prompt_token_ids=prompt_ids, max_new_tokens=16, temperature=0)
    )
    head = full.token_ids[:6]
    rest = await smollm2_engine.generate(
        GenerationRequest(prompt_token_ids=prompt_ids + head, max_new_tokens=10, temperature=0)
    )
    assert head + rest.token_ids == full.token_ids
    assert smollm2.tokenizer.decode(head) + rest.text == full.text


async def test_prefix_cache_reuses_shared_prompt(make_engine: Any) -> None:
    system = {"role": "system", "content": "You are a concise assistant answering geography questions."}
    cached = make_engine(max_batch_size=2)
    plain = make_engine(max_batch_size=2, prefix_cache_tokens=0)
    first = [{**system}, {"role": "user", "content": "What is the capital of Italy?"}]
    second = [{**system}, {"role": "user", "content": "What is the capital of Spain?"}]
    await cached.generate(GenerationRequest(messages=first, max_new_tokens=4, temperature=0))
    hit = await cached.generate(GenerationRequest(messages=second, max_new_tokens=8, temperature=0))
    miss = await plain.generate(GenerationRequest(messages=second, max_new_tokens=8, temperature=0))
    assert hit.usage.cached_prompt_tokens >= 20
    assert miss.usage.cached_prompt_tokens == 0
    assert hit.token_ids == miss.token_ids
    assert cached.stats()["prefix_cache_hit_rate"] > 0 and plain.stats()["prefix_cache_hit_rate"] == 0


async def test_queue_limit_raises_overloaded(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=1, max_queue_size=1)
    running = engine.stream(greedy(PROMPTS[3], 400))
    await running.__anext__()
    waiting = engine.stream(greedy(PROMPTS[0], 4))
    waiting_task = asyncio.create_task(waiting.__anext__())
    for _ in range(200):
        if engine.stats()["queue_depth"] == 1:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(EngineOverloaded) as err:
        await engine.generate(greedy(PROMPTS[1], 4))
    assert err.value.reason == "overloaded"
    await running.aclose()
    assert (await waiting_task).token_ids  # the queued request runs once the slot frees
    await waiting.aclose()


async def test_chat_messages(smollm2_engine: Any) -> None:
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    result = await smollm2_engine.generate(GenerationRequest(messages=msgs, max_new_tokens=12, temperature=0))
    assert "Paris" in result.text
    assert result.usage.prompt_tokens > 10


@pytest.mark.parametrize(
    "request_",
    [
        GenerationRequest(),
        GenerationRequest(prompt="a", messages=[{"role": "user", "content": "b"}]),
        GenerationRequest(prompt_token_ids=[-1]),
        GenerationRequest(prompt="a", temperature=-1.0),
        GenerationRequest(prompt="a", max_new_tokens=0),
        GenerationRequest(prompt="a", top_p=0.0),
        GenerationRequest(prompt="a", stop="x"),  # type: ignore[arg-type]
        GenerationRequest(messages=[{"content": "no role"}]),
        GenerationRequest(prompt=""),
    ],
)
async def test_invalid_requests(smollm2_engine: Any, request_: GenerationRequest) -> None:
    with pytest.raises(InvalidRequest) as err:
        await smollm2_engine.generate(request_)
    assert err.value.reason == "invalid_request"


async def test_closed_engine_refuses(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=1)
    await engine.aclose()
    with pytest.raises(EngineClosed) as err:
        await engine.generate(greedy(PROMPTS[0], 2))
    assert err.value.reason == "shutting_down"


async def test_stats_and_metadata(smollm2_engine: Any) -> None:
    await smollm2_engine.generate(greedy(PROMPTS[0], 4))
    stats = smollm2_engine.stats()
    keys = ("queue_depth", "active_streams", "tokens_per_s", "free_cache_tokens", "prefix_cache_hit_rate")
    for key in keys:
        assert isinstance(stats[key], (int, float))
    assert stats["free_cache_tokens"] == 8 * 512
    assert smollm2_engine.metadata["serving"]["max_batch_size"] == 8
    assert smollm2_engine.metadata["context_length"] == 512


async def test_small_engine_narrows_metadata_context(make_engine: Any) -> None:
    from sdk.inference.metadata import validate_metadata

    doc = make_engine(max_sequence_length=64, max_batch_size=1).metadata
    assert doc["context_length"] == 64 and doc["serving"]["max_sequence_length"] == 64
    validate_metadata(doc)


@pytest.mark.slow
async def test_start_loads_the_bundled_model_and_warms_up() -> None:
    from sdk.inference import Engine, EngineConfig

    engine = await Engine.start(EngineConfig(device="cpu", max_sequence_length=128, max_batch_size=2))
    try:
        assert engine.metadata["name"] == "SmolLM2-135M-Instruct"
        assert engine.metadata["serving"]["max_batch_size"] == 2
        assert engine.stats()["completed_requests"] == 1  # the warm-up generation
        result = await engine.generate(greedy("The capital of France is", 6))
        assert "Paris" in result.text
    finally:
        await engine.aclose()


async def test_cuda_graphs_option_falls_back_on_cpu(make_engine: Any, smollm2_engine: Any) -> None:
    engine = make_engine(max_batch_size=1, cuda_graphs=True)
    assert engine.metadata["serving"]["cuda_graphs"] is False
    ours = await engine.generate(greedy(PROMPTS[0], 6))
    assert ours.token_ids == (await smollm2_engine.generate(greedy(PROMPTS[0], 6))).token_ids


async def test_chunked_prefill_matches_whole_prefill(make_engine: Any, smollm2_engine: Any) -> None:
    chunked = make_engine(max_batch_size=2, prefill_chunk_size=7, prefix_cache_tokens=0)
    request = greedy(PROMPTS[3], 10)  # a 19-token prompt: three prefill chunks
    ours, busy = await asyncio.gather(chunked.generate(request), chunked.generate(greedy(PROMPTS[1], 10)))
    assert ours.token_ids == (await smollm2_engine.generate(request)).token_ids
    assert busy.token_ids == (await smollm2_engine.generate(greedy(PROMPTS[1], 10))).token_ids
