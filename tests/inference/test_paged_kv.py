"""The paged KV cache: the block pool (allocation, reference counts, prefix index, eviction, growth,
shrinking) on real block tensors, and the engine over it on the real SmolLM2 (greedy outputs equal
``model.generate``'s, cancellation frees blocks, prefix reuse, a budget held under 32 streams)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from sdk.inference import GenerationRequest  # noqa: E402
from sdk.inference.block_pool import BlockPool, block_hash  # noqa: E402
from sdk.inference.kv_cache import PagedKVCache  # noqa: E402
from sdk.inference.placement import InsufficientMemory, parse_bytes  # noqa: E402
from sdk.testing.waiting import until  # noqa: E402

BS = 4


def pool_with_tensors(*, max_blocks: int = 12, initial: int = 4, grow: int = 4, cache: int = 8) -> BlockPool:
    cache_t = PagedKVCache(layers=2, kv_heads=1, head_dim=2, block_size=BS, dtype=torch.float32,
                           device=torch.device("cpu"))
    return BlockPool(block_size=BS, max_blocks=max_blocks, storage=cache_t, initial_blocks=initial,
                     grow_blocks=grow, cache_blocks=cache)


def fill(pool: BlockPool, block: int, value: float) -> None:
    storage = pool.storage
    assert isinstance(storage, PagedKVCache)
    for t in storage.k + storage.v:
        t[block].fill_(value)


def value(pool: BlockPool, block: int) -> float:
    storage = pool.storage
    assert isinstance(storage, PagedKVCache)
    return float(storage.k[1][block, 0, 0, 0])


def register_chain(pool: BlockPool, blocks: list[int], tokens: list[int]) -> list[bytes]:
    keys: list[bytes] = []
    for i, block in enumerate(blocks):
        parent = keys[-1] if keys else None
        chunk = tokens[i * BS : (i + 1) * BS]
        keys.append(block_hash(parent, chunk))
        assert pool.register(block, keys[-1], parent, chunk)
    return keys


# ---------------------------------------------------------------------------------------- block pool
def test_allocate_free_and_refcounts() -> None:
    pool = pool_with_tensors()
    blocks = pool.allocate(3)
    assert blocks is not None and len(set(blocks)) == 3 and 0 not in blocks  # block 0 is scratch
    assert all(pool.refcount(b) == 1 for b in blocks) and pool.referenced == 3
    pool.free(blocks)
    assert pool.referenced == 0 and pool.free_blocks == pool.capacity
    with pytest.raises(ValueError):
        pool.free(blocks[:1])  # freed twice


def test_pool_grows_in_chunks_up_to_its_budget_and_keeps_contents() -> None:
    pool = pool_with_tensors(max_blocks=10, initial=4, grow=4)
    first = pool.allocate(4)
    assert first is not None and pool.capacity == 4
    for i, block in enumerate(first):
        fill(pool, block, float(i + 1))
    more = pool.allocate(3)
    assert more is not None and pool.capacity == 8 and pool.grows == 1
    assert [value(pool, b) for b in first] == [1.0, 2.0, 3.0, 4.0]  # copied into the larger tensors
    storage = pool.storage
    assert isinstance(storage, PagedKVCache) and storage.k[0].shape[0] == 9  # + the scratch block
    assert pool.allocate(4) is None  # 7 taken, 10 at most: refused whole, nothing taken
    assert pool.referenced == 7 and pool.available() == 3
    assert pool.allocate(3) is not None and pool.capacity == 10
    assert pool.allocate(1) is None


def test_shared_prefix_blocks_by_reference_and_lru_eviction_tail_first() -> None:
    pool = pool_with_tensors(max_blocks=6, initial=6, cache=0)
    tokens = list(range(100, 112))  # three full blocks
    a = pool.allocate(3)
    assert a is not None
    keys = register_chain(pool, a, tokens)
    blocks, got_keys, partial = pool.match([*tokens, 7], limit=12)
    assert blocks == a and got_keys == keys and partial == (0, 0)
    assert all(pool.refcount(b) == 2 for b in a)  # shared, not copied
    pool.free(blocks)
    pool.free(a)
    assert pool.referenced == 0 and pool.evictable_blocks == 3 and pool.cached_blocks == 3
    other = pool.allocate(4)  # 3 free + 1 eviction: the chain's tail goes first
    assert other is not None and pool.evictions == 1 and a[2] in other
    assert pool.match(tokens, limit=12)[0] == a[:2]  # the head of the chain is still cached


def test_a_partial_block_match_names_the_block_and_the_tokens_to_copy() -> None:
    pool = pool_with_tensors()
    tokens = [5, 6, 7, 8, 9, 10, 11, 12]
    a = pool.allocate(2)
    assert a is not None
    register_chain(pool, a, tokens)
    pool.free(a)
    blocks, _, (block, n) = pool.match([5, 6, 7, 8, 9, 10, 99, 98, 97], limit=8)
    assert blocks == [a[0]] and block == a[1] and n == 2
    assert pool.refcount(block) == 1  # held until the caller has copied it
    pool.free([block, *blocks])
    assert pool.referenced == 0


def test_idle_pool_compacts_to_its_most_recent_cached_blocks() -> None:
    pool = pool_with_tensors(max_blocks=12, initial=4, grow=4, cache=2)
    old, new = pool.allocate(5), None
    assert old is not None and pool.capacity == 8
    register_chain(pool, old[:2], [1, 2, 3, 4, 5, 6, 7, 8])
    new = pool.allocate(2)
    assert new is not None
    register_chain(pool, new, [9, 9, 9, 9, 8, 8, 8, 8])
    fill(pool, new[0], 42.0)
    fill(pool, new[1], 43.0)
    assert not pool.compact(keep_cached=2, min_capacity=4)  # blocks still referenced
    pool.free(old)
    pool.free(new)
    assert pool.compact(keep_cached=2, min_capacity=4)
    assert pool.capacity == 4 and pool.cached_blocks == 2 and pool.shrinks == 1
    storage = pool.storage
    assert isinstance(storage, PagedKVCache) and storage.k[0].shape[0] == 5
    blocks, _, _ = pool.match([9, 9, 9, 9, 8, 8, 8, 8, 1], limit=8)
    assert [value(pool, b) for b in blocks] == [42.0, 43.0]  # moved with their contents
    assert pool.match([1, 2, 3, 4, 5], limit=4)[0] == []  # the older chain was dropped


def test_sizes_parse() -> None:
    assert parse_bytes("1GiB") == 1 << 30 and parse_bytes("512MiB") == 512 << 20
    assert parse_bytes("2G") == 2 * 10**9 and parse_bytes("1500000") == 1_500_000
    for bad in ("", "lots", "1XB", "-1GiB", "0", "inf"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


# ---------------------------------------------------------------------------------------- engine
pytestmark_model = pytest.mark.model

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "def fibonacci(n):",
    "The three most important ideas in modern physics are, in the order they were found,",
]


def greedy(prompt: str, n: int = 12, **kw: Any) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, max_new_tokens=n, temperature=0.0, **kw)


def reference(smollm2: Any, prompt: str, n: int) -> list[int]:
    ids = smollm2.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = smollm2.model.generate(ids, max_new_tokens=n, do_sample=False, attention_mask=torch.ones_like(ids))
    return [int(t) for t in out[0, ids.shape[1]:]]


@pytest.fixture(scope="module")
def references(smollm2: Any) -> dict[str, list[int]]:
    return {p: reference(smollm2, p, 20) for p in PROMPTS}


def matches(ids: list[int], ref: list[int]) -> bool:
    """The engine's ids are ``generate``'s (it may stop earlier, at EOS)."""
    return ids == ref[: len(ids)] and len(ids) > 0


@pytestmark_model
async def test_small_blocks_batched_rows_of_different_lengths_equal_generate(
    make_engine: Any, references: dict[str, list[int]]
) -> None:
    engine = make_engine(max_batch_size=4, kv_block_size=4, prefix_cache_tokens=0)
    results = await asyncio.gather(*(engine.generate(greedy(p, 20)) for p in PROMPTS))
    for prompt, result in zip(PROMPTS, results, strict=True):
        assert matches(result.token_ids, references[prompt]), prompt
    assert engine.stats()["kv_blocks_used"] == 0


@pytestmark_model
async def test_cancelling_a_stream_frees_its_blocks(make_engine: Any) -> None:
    engine = make_engine(max_batch_size=2)
    stream = engine.stream(greedy(PROMPTS[1], 200))
    async with contextlib.aclosing(stream):
        async for _ in stream:
            assert engine.stats()["kv_blocks_used"] >= 2
            break
    await until(lambda: engine.stats()["kv_blocks_used"] == 0 and engine.stats()["active_streams"] == 0)
    assert engine.stats()["free_cache_tokens"] == engine.plan.max_tokens


@pytestmark_model
async def test_prefix_reuse_gives_the_same_output_and_a_hit(make_engine: Any, references: dict[str, list[int]]) -> None:
    engine = make_engine(max_batch_size=2, kv_block_size=8)
    prompt = PROMPTS[3]
    first = await engine.generate(greedy(prompt, 20))
    second = await engine.generate(greedy(prompt, 20))
    assert first.usage.cached_prompt_tokens == 0
    assert second.usage.cached_prompt_tokens == first.usage.prompt_tokens - 1  # all but the last token
    assert first.token_ids == second.token_ids and matches(second.token_ids, references[prompt])
    # The next turn (prompt + reply + more) reuses the reply's blocks too.
    turn = await engine.generate(GenerationRequest(
        prompt_token_ids=[*engine.encode(greedy(prompt)), *first.token_ids, 198], max_new_tokens=4, temperature=0))
    assert turn.usage.cached_prompt_tokens >= first.usage.prompt_tokens + len(first.token_ids) - 8
    stats = engine.stats()
    looked_up = 2 * first.usage.prompt_tokens + turn.usage.prompt_tokens
    hit = second.usage.cached_prompt_tokens + turn.usage.cached_prompt_tokens
    assert stats["prefix_cache_hits"] == 2 and stats["prefix_cache_hit_rate"] == pytest.approx(hit / looked_up)


@pytestmark_model
async def test_thirty_two_streams_stay_inside_a_small_budget(
    make_engine: Any, smollm2: Any, references: dict[str, list[int]]
) -> None:
    from sdk.inference.placement import kv_bytes_per_token

    per_block = 16 * kv_bytes_per_token(smollm2.model.config, torch.float32)
    engine = make_engine(max_batch_size=32, max_sequence_length=128, kv_memory=10 * per_block,
                         prefix_cache_tokens=0)
    assert engine.plan.max_blocks == 10
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, engine.stats()["active_streams"])
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*(engine.generate(greedy(p, 20)) for p in prompts))
    finally:
        watcher.cancel()
    for prompt, result in zip(prompts, results, strict=True):
        assert matches(result.token_ids, references[prompt]), prompt  # preempted ones too
    stats = engine.stats()
    assert stats["kv_peak_blocks"] <= 10 and stats["kv_blocks"] <= 10
    assert 1 < peak < 32  # they ran together, as many as the budget held
    assert stats["kv_preemptions"] > 0 and stats["kv_blocks_used"] == 0


@pytestmark_model
async def test_idle_engine_shrinks_its_pool_and_keeps_working(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch, references: dict[str, list[int]]
) -> None:
    from sdk.inference import placement

    monkeypatch.setattr(placement, "KV_GROW_BYTES", 1)  # grow 16 blocks at a time
    engine = make_engine(max_batch_size=4, max_sequence_length=256, kv_block_size=4, prefix_cache_tokens=8,
                         kv_idle_shrink_s=0.2)
    start = engine.stats()["kv_blocks"]
    assert start == 16
    results = await asyncio.gather(*(engine.generate(greedy(p, 20)) for p in PROMPTS))
    assert engine.stats()["kv_peak_blocks"] > start  # it grew under load
    await until(lambda: engine.stats()["kv_blocks"] == start, timeout=10)
    assert engine.stats()["kv_cache_bytes"] == (start + 1) * engine.plan.bytes_per_block
    again = await engine.generate(greedy(PROMPTS[1], 20))
    assert again.token_ids == results[1].token_ids and matches(again.token_ids, references[PROMPTS[1]])


@pytestmark_model
async def test_a_partial_block_is_reused_after_the_pool_grew_during_decode(
    make_engine: Any, monkeypatch: pytest.MonkeyPatch, smollm2: Any, references: dict[str, list[int]]
) -> None:
    from sdk.inference import placement

    monkeypatch.setattr(placement, "KV_GROW_BYTES", 1)  # 16 blocks at start: decode has to grow the pool
    engine = make_engine(max_batch_size=4, kv_block_size=4)
    results = await asyncio.gather(*(engine.generate(greedy(p, 20)) for p in PROMPTS[1:]))
    assert engine.stats()["kv_peak_blocks"] > 16
    ids = engine.encode(greedy(PROMPTS[1]))
    follow = [*ids, *results[0].token_ids[:3]]  # 22 tokens: 5 cached blocks + 1 token of the 6th
    again = await engine.generate(GenerationRequest(prompt_token_ids=follow, max_new_tokens=6, temperature=0))
    assert again.usage.cached_prompt_tokens == len(follow) - 1 and (len(follow) - 1) % 4 != 0
    assert again.token_ids == results[0].token_ids[3:9]
    assert engine.stats()["kv_blocks_used"] == 0


@pytestmark_model
def test_a_budget_below_one_sequence_is_insufficient_memory(make_engine: Any) -> None:
    with pytest.raises(InsufficientMemory) as err:
        make_engine(max_batch_size=1, kv_memory=4096)
    assert err.value.reason == "insufficient_memory"


def test_serve_rejects_a_malformed_kv_memory_before_loading() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "sdk", "serve", "--device", "cpu", "--kv-memory", "lots"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "invalid_option" in done.stderr and "--kv-memory" in done.stderr
    assert "engine ready" not in done.stderr
