"""The continuous-batching loop: one worker thread owns the model, the paged KV cache and the
running sequences.

Each iteration it (1) applies cancellations, (2) admits waiting sequences while blocks for their
prompt are available (reusing cached prefix blocks), (3) prefills up to ``prefill_chunk_size``
prompt tokens (long prompts take several iterations), and (4) runs ONE decode step for every
decoding sequence together. A decode step that finds no free block preempts the newest running
sequence (its blocks are freed; it waits at the head of the queue and is recomputed, mostly from
its own cached blocks, when room returns). After ``idle_shrink_s`` with nothing to do the pool
shrinks back to its cached prefix blocks. Chunks go back to each consumer's asyncio queue with
``call_soon_threadsafe``; torch releases the GIL while it computes, so the event loop stays
responsive.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .block_pool import SCRATCH_BLOCK, BlockPool, block_hash
from .detokenizer import IncrementalDetokenizer, StopMatcher
from .errors import EngineClosed, EngineOverloaded, InferenceError
from .kv_cache import PagedKVCache, StepContext, active_context
from .placement import InsufficientMemory
from .sampling import SamplingParams, sample_rows
from .types import FinishReason, TokenChunk, Usage

if TYPE_CHECKING:
    from .cuda_graphs import CudaGraphDecoder

log = logging.getLogger(__name__)

__all__ = ["Scheduler", "Sequence"]

_RATE_WINDOW_S = 10.0


@dataclass(eq=False)
class Sequence:
    """One request inside the scheduler (worker-thread state, plus where its chunks go)."""

    prompt_ids: list[int]
    max_new_tokens: int
    params: SamplingParams
    generator: torch.Generator | None
    detok: IncrementalDetokenizer
    stop: StopMatcher
    eos_ids: frozenset[int]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    request_id: str
    submitted_at: float = field(default_factory=time.perf_counter)
    id: int = 0
    generated: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # the block table: block i holds positions i*bs..
    keys: list[bytes] = field(default_factory=list)  # prefix-index keys of its first len(keys) blocks
    pos: int = 0  # tokens whose KV is in the blocks
    target: int = 0  # prefill runs until pos reaches it (the prompt; after a preemption, all tokens)
    cached_tokens: int = 0
    preemptions: int = 0
    first_token_at: float | None = None
    done: bool = False
    running: bool = False
    matcher: Any = None  # structured output: the sequence's grammar (sdk.inference.structured.Matcher)

    @property
    def decoding(self) -> bool:
        """Prefilled, not finished, and its last sampled token not yet in the cache."""
        in_cache = len(self.prompt_ids) + len(self.generated) - 1
        return not self.done and bool(self.generated) and self.pos == in_cache

    def token(self, i: int) -> int:
        """Token ``i`` of prompt + output."""
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.generated[i - n]

    def tokens(self, start: int, stop: int) -> list[int]:
        """Tokens ``start..stop-1`` of prompt + output."""
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.generated[start - n : stop - n]
        return self.prompt_ids[start:] + self.generated[: stop - n]

    def next_input(self) -> int:
        """The token the next decode step feeds (the last one sampled)."""
        return self.generated[-1]


class Scheduler:
    """Running sequences, queue, block pool and the worker thread; see the module docstring."""

    def __init__(
        self,
        model: Any,
        *,
        cache: PagedKVCache,
        pool: BlockPool,
        max_batch_size: int,
        max_sequence_length: int,
        max_queue_size: int,
        prefill_chunk_size: int,
        prefix_caching: bool = True,
        idle_shrink_s: float = 2.0,
        min_blocks: int = 0,
        decoder: CudaGraphDecoder | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.pool = pool
        self.block_size = pool.block_size
        self.max_batch_size = max_batch_size
        self.max_sequence_length = max_sequence_length
        self.max_queue_size = max_queue_size
        self.prefill_chunk_size = prefill_chunk_size
        self.prefix_caching = prefix_caching
        self.idle_shrink_s = idle_shrink_s
        self.min_blocks = min_blocks
        self.decoder = decoder  # optional fixed-shape (CUDA graph) decode step
        self.device = cache.device
        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cancels: set[int] = set()
        self._running: list[Sequence] = []
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._outbox: list[tuple[Sequence, Any]] = []
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self._idle_since: float | None = None
        self.completed = 0
        self.generated_tokens = 0
        self.preemptions = 0
        self.peak_blocks = pool.capacity
        self.mask_filler: Any = None  # structured output: fills grammar bitmasks (set with the first one)

    # ------------------------------------------------------------------ called from any thread
    def start(self) -> None:
        """Start the worker thread."""
        self._thread = threading.Thread(target=self._run, name="autoglm-engine", daemon=True)
        self._thread.start()

    def submit(self, seq: Sequence) -> None:
        """Queue ``seq``; raises ``EngineOverloaded`` when the queue is full, ``EngineClosed`` after stop."""
        with self._cv:
            if self._stopping:
                raise EngineClosed("the engine is closed")
            if len(self._waiting) >= self.max_queue_size and self.free_slots() == 0:
                log.warning("queue full (%d waiting); rejecting %s", len(self._waiting), seq.request_id)
                raise EngineOverloaded(f"{len(self._waiting)} requests already waiting; retry later")
            seq.id = next(self._ids)
            seq.target = len(seq.prompt_ids)
            self._waiting.append(seq)
            self._cv.notify()

    def cancel(self, seq_id: int) -> None:
        """Ask the worker to end ``seq_id`` and free its blocks at the next iteration."""
        with self._cv:
            self._cancels.add(seq_id)
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """End the worker; waiting and running sequences fail with ``EngineClosed``."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def free_slots(self) -> int:
        """How many more sequences could run at once."""
        return self.max_batch_size - len(self._running)

    def stats(self) -> dict[str, Any]:
        """Live figures; read without locks, so momentarily approximate."""
        now = time.perf_counter()
        rate = list(self._rate)
        recent = [n for t, n in rate if now - t <= _RATE_WINDOW_S]
        span = (now - min(t for t, _ in rate if now - t <= _RATE_WINDOW_S)) if recent else 0.0
        pool, bs = self.pool, self.block_size
        return {
            "queue_depth": len(self._waiting),
            "active_streams": len(self._running),
            "max_batch_size": self.max_batch_size,
            "max_sequence_length": self.max_sequence_length,
            "tokens_per_s": (sum(recent) / span) if span > 0 else 0.0,
            "free_cache_tokens": (pool.max_blocks - pool.referenced) * bs,
            "free_slots": self.free_slots(),
            "completed_requests": self.completed,
            "generated_tokens": self.generated_tokens,
            "prefix_cache_hit_rate": pool.hit_rate,
            "prefix_cache_hits": pool.hits,
            "prefix_cache_lookups": pool.lookups,
            "prefix_cache_entries": pool.cached_blocks,
            "prefix_cache_tokens": pool.cached_blocks * bs,
            "kv_block_size": bs,
            "kv_blocks": pool.capacity,
            "kv_blocks_used": pool.referenced,
            "kv_peak_blocks": self.peak_blocks,
            "kv_max_blocks": pool.max_blocks,
            "kv_cache_bytes": self.cache.nbytes,
            "kv_budget_bytes": pool.max_blocks * self.cache.bytes_per_block,
            "kv_preemptions": self.preemptions,
        }

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            shrink = False
            with self._cv:
                while not (self._stopping or self._waiting or self._cancels or self._running):
                    if not self._shrinkable():
                        self._cv.wait()
                        continue
                    wait = self.idle_shrink_s - (time.monotonic() - (self._idle_since or time.monotonic()))
                    if wait <= 0:
                        shrink = True
                        break
                    self._cv.wait(wait)
                if self._stopping:
                    break
                cancels, self._cancels = self._cancels, set()
            if shrink:
                with torch.inference_mode():
                    self._shrink()
                continue
            try:
                with torch.inference_mode():  # KV tensors are made and written in inference mode only
                    self._apply_cancels(cancels)
                    self._admit()
                    self._prefill()
                    self._decode()
            except Exception as exc:  # a failed step fails its sequences, not the engine
                log.exception("engine step failed")
                self._fail_running(InferenceError(f"generation failed: {exc}"))
            self._flush()
            if not self._running and self._idle_since is None:
                self._idle_since = time.monotonic()
            elif self._running:
                self._idle_since = None
        self._shutdown()

    def _shrinkable(self) -> bool:
        pool = self.pool
        keep = min(pool.evictable_blocks, pool.cache_blocks)
        return pool.referenced == 0 and pool.capacity > max(keep, self.min_blocks)

    def _shrink(self) -> None:
        before = self.cache.nbytes
        try:
            if self.pool.compact(keep_cached=self.pool.cache_blocks, min_capacity=self.min_blocks):
                log.info("KV pool idle: shrunk from %.1f to %.1f MiB (%d cached blocks kept)", before / 2**20,
                         self.cache.nbytes / 2**20, self.pool.evictable_blocks)
        except Exception:  # shrinking is an optimisation; keep serving at the current size
            log.exception("could not shrink the KV pool")
            self.min_blocks = self.pool.capacity
        self._idle_since = None

    def _apply_cancels(self, ids: set[int]) -> None:
        if not ids:
            return
        for waiting in list(self._waiting):
            if waiting.id in ids:
                self._waiting.remove(waiting)
                self._finish(waiting, "cancelled", "")
        for running in list(self._running):
            if running.id in ids:
                self._finish(running, "cancelled", "")

    def _admit(self) -> None:
        """Admit waiting sequences (FIFO) while a batch row and blocks for their prompt are free."""
        bs = self.block_size
        while len(self._running) < self.max_batch_size:
            with self._cv:
                if not self._waiting:
                    return
                seq = self._waiting[0]
            target = seq.target
            blocks: list[int] = []
            keys: list[bytes] = []
            partial, copied = SCRATCH_BLOCK, 0
            if self.prefix_caching:
                blocks, keys, (partial, copied) = self.pool.match(seq.tokens(0, target), limit=target - 1)
            needed = -(-target // bs) - len(blocks)
            reserve = 0 if target % bs else 1  # room for the first sampled token's KV
            fresh = self.pool.allocate(needed) if self.pool.available() >= needed + reserve else None
            if copied:  # the cached block that continues the match: copy its first positions
                try:
                    if fresh is not None:
                        self.cache.copy_block(partial, fresh[0], copied)
                except Exception:  # the cache is an optimisation: prefill those tokens instead
                    log.exception("could not copy a cached KV block")
                    copied = 0
                self.pool.free([partial])
            if fresh is None:
                self.pool.free(blocks)
                if self._running:
                    return  # it waits for running sequences to give blocks back
                # Only when the pool could not grow to its budget (the device ran out of memory).
                log.error("no KV blocks for %s (%d tokens) with nothing running", seq.request_id, target)
                with self._cv:
                    self._waiting.popleft()
                seq.done = True
                self._emit(seq, InsufficientMemory(f"the KV cache cannot hold {target} tokens now"))
                continue
            with self._cv:
                self._waiting.popleft()
            self.peak_blocks = max(self.peak_blocks, self.pool.capacity)
            seq.blocks, seq.keys = blocks + fresh, keys
            seq.pos = len(blocks) * bs + copied
            if seq.preemptions == 0:
                seq.cached_tokens = seq.pos
                if self.prefix_caching:
                    self.pool.record(len(seq.prompt_ids), seq.pos)
            seq.running = True
            self._running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s blocks and put it back at the head of the queue (recomputed later)."""
        log.info("KV pool full: preempting %s (%d tokens) to recompute later", seq.request_id, seq.pos)
        self._release(seq)
        seq.pos = 0
        seq.target = len(seq.prompt_ids) + len(seq.generated)
        seq.preemptions += 1
        self.preemptions += 1
        with self._cv:
            self._waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        """Give back ``seq``'s blocks (cached full blocks stay reusable) and its batch row."""
        if seq.running:
            self._running.remove(seq)
            seq.running = False
        if seq.blocks:
            self.pool.free(seq.blocks)
            seq.blocks, seq.keys = [], []

    def _register(self, seq: Sequence) -> None:
        """Enter ``seq``'s newly filled blocks into the prefix index."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        while (len(seq.keys) + 1) * bs <= seq.pos:
            i = len(seq.keys)
            parent = seq.keys[-1] if seq.keys else None
            tokens = seq.tokens(i * bs, (i + 1) * bs)
            key = block_hash(parent, tokens)
            self.pool.register(seq.blocks[i], key, parent, tokens)
            seq.keys.append(key)

    def _prefill(self) -> None:
        """Prefill the next prompt chunks of up to ``prefill_chunk_size`` tokens in one forward pass."""
        budget = self.prefill_chunk_size
        work: list[tuple[Sequence, int]] = []
        for seq in sorted(self._running, key=lambda s: s.id):
            remaining = seq.target - seq.pos
            if remaining > 0 and budget > 0:
                n = min(remaining, budget)
                work.append((seq, n))
                budget -= n
        if not work:
            return
        logits = self._forward(
            [seq for seq, _ in work],
            [seq.tokens(seq.pos, seq.pos + n) for seq, n in work],
        )
        done: list[tuple[Sequence, int]] = []
        for row, (seq, n) in enumerate(work):
            seq.pos += n
            self._register(seq)
            if seq.pos == seq.target:
                done.append((seq, row))
        if done:
            rows = logits[[row for _, row in done]]
            masks = self._masks(self._start_masks([seq for seq, _ in done]))
            tokens = sample_rows(rows, [seq.params for seq, _ in done], [seq.generator for seq, _ in done],
                                 masks=masks)
            for (seq, _), token in zip(done, tokens, strict=True):
                self._accept(seq, token)

    def _grow_tables(self, batch: list[Sequence]) -> list[Sequence]:
        """Give every decoding sequence a block for its next position; preempt the newest running
        sequences while the pool has none. Returns the sequences still in the batch."""
        bs = self.block_size
        for seq in sorted(batch, key=lambda s: s.id):
            while seq.running and seq.pos // bs >= len(seq.blocks):
                block = self.pool.allocate(1)
                if block is not None:
                    seq.blocks.extend(block)
                    break
                self._preempt(max(self._running, key=lambda s: s.id))
        self.peak_blocks = max(self.peak_blocks, self.pool.capacity)
        return [s for s in batch if s.running]

    def _decode(self) -> None:
        batch = self._grow_tables([s for s in self._running if s.decoding])
        if not batch:
            return
        pending = self._start_masks(batch)  # grammar masks fill on the CPU while the model runs
        logits = self.decoder(batch) if self.decoder is not None else None
        if logits is None:
            logits = self._forward(batch, [[s.next_input()] for s in batch])
        tokens = sample_rows(logits, [s.params for s in batch], [s.generator for s in batch],
                             masks=self._masks(pending))
        for seq, tok in zip(batch, tokens, strict=True):
            seq.pos += 1
            self._register(seq)
            self._accept(seq, tok)

    # ------------------------------------------------------------------ structured output
    def _start_masks(self, batch: list[Sequence]) -> tuple[list[int], Any] | None:
        """Start filling the bitmasks of the constrained rows of ``batch`` (None: none is)."""
        rows = [i for i, s in enumerate(batch) if s.matcher is not None]
        if not rows or self.mask_filler is None:
            return None
        return rows, self.mask_filler.start([batch[i].matcher for i in rows])

    @staticmethod
    def _masks(pending: tuple[list[int], Any] | None) -> tuple[list[int], torch.Tensor] | None:
        return None if pending is None else (pending[0], pending[1].result())

    # ------------------------------------------------------------------ model
    def _forward(self, seqs: list[Sequence], tokens: list[list[int]]) -> torch.Tensor:
        """Run the model on new tokens of ``seqs`` (from each one's ``pos``); return each row's
        last-token logits [B, vocab].

        Rows shorter than the widest are padded on the left; pad tokens write to the scratch
        block and no real token attends to them.
        """
        dev, bs = self.device, self.block_size
        width = max(len(t) for t in tokens)
        padded: list[int] = []
        pos_rows: list[list[int]] = []
        write_index: list[int] = []
        for seq, toks in zip(seqs, tokens, strict=True):
            pad = width - len(toks)
            padded += [0] * pad + toks
            positions = range(seq.pos, seq.pos + len(toks))
            pos_rows.append([0] * pad + list(positions))
            write_index += [SCRATCH_BLOCK * bs] * pad + [seq.blocks[p // bs] * bs + p % bs for p in positions]
        n_blocks = max(-(-(seq.pos + len(t)) // bs) for seq, t in zip(seqs, tokens, strict=True))
        tables = [seq.blocks[:n_blocks] + [SCRATCH_BLOCK] * (n_blocks - len(seq.blocks[:n_blocks])) for seq in seqs]
        input_ids = torch.tensor(padded, dtype=torch.long, device=dev).view(len(seqs), width)
        positions_t = torch.tensor(pos_rows, dtype=torch.long, device=dev)
        mask = torch.arange(n_blocks * bs, device=dev)[None, None, None, :] <= positions_t[:, None, :, None]
        ctx = StepContext(
            cache=self.cache,
            write_index=torch.tensor(write_index, dtype=torch.long, device=dev),
            tables=torch.tensor(tables, dtype=torch.long, device=dev),
            mask=mask,
        )
        with active_context(ctx):
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions_t,
                use_cache=False,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :]

    def _accept(self, seq: Sequence, token: int) -> None:
        """Record a sampled token, emit its text, and finish the sequence when it should end."""
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
        seq.generated.append(token)
        self.generated_tokens += 1
        self._rate.append((now, 1))
        while self._rate and now - self._rate[0][0] > _RATE_WINDOW_S:
            self._rate.popleft()
        if token in seq.eos_ids:
            self._finish(seq, "stop", "", final_ids=[token], flush=True)
            return
        if seq.matcher is not None and not seq.matcher.accept(token):  # cannot happen under its mask
            log.error("grammar of %s refused token %d: %s", seq.request_id, token, seq.matcher.error)
            seq.done = True
            self._emit(seq, InferenceError(f"the grammar refused token {token}"))
            self._release(seq)
            return
        text, stopped = seq.stop.feed(seq.detok.push(token))
        if seq.matcher is not None and seq.matcher.finished and not stopped:
            self._finish(seq, "stop", text, final_ids=[token], flush=True)
        elif stopped:
            self._finish(seq, "stop", text, final_ids=[token])
        elif len(seq.generated) >= seq.max_new_tokens:
            self._finish(seq, "length", text, final_ids=[token], flush=True)
        else:
            self._emit(seq, TokenChunk(text=text, token_ids=[token]))

    def _finish(
        self, seq: Sequence, reason: FinishReason, text: str, *, final_ids: list[int] | None = None,
        flush: bool = False,
    ) -> None:
        """Emit the last chunk with usage and free the sequence's blocks."""
        if seq.done:
            return
        seq.done = True
        if flush:  # release text held for an incomplete character or a possible stop string
            tail, stopped = seq.stop.feed(seq.detok.flush())
            text += tail
            if stopped:
                reason = "stop"
            else:
                text += seq.stop.flush()
        now = time.perf_counter()
        first = seq.first_token_at
        n = len(seq.generated)
        decode_s = (now - first) if first is not None else 0.0
        usage = Usage(
            prompt_tokens=len(seq.prompt_ids),
            completion_tokens=n,
            time_to_first_token_s=(first - seq.submitted_at) if first is not None else 0.0,
            tokens_per_s=((n - 1) / decode_s) if n > 1 and decode_s > 0 else 0.0,
            cached_prompt_tokens=seq.cached_tokens,
        )
        last = TokenChunk(text=text, token_ids=list(final_ids or []), finish_reason=reason, usage=usage)
        self._emit(seq, last)
        self.completed += 1
        self._release(seq)

    def _fail_running(self, exc: BaseException) -> None:
        for seq in list(self._running):
            seq.done = True
            self._emit(seq, exc)
            self._release(seq)

    def _shutdown(self) -> None:
        closed = EngineClosed("the engine was closed")
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for seq in waiting:
            self._emit(seq, closed)
        self._fail_running(closed)
        self._flush()

    def _emit(self, seq: Sequence, item: Any) -> None:
        self._outbox.append((seq, item))

    def _flush(self) -> None:
        """Hand this iteration's chunks to their event loops, one callback per loop."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for seq, item in self._outbox:
            by_loop.setdefault(seq.loop, []).append((seq.queue, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the consumer's loop is closed; nobody is listening
                log.debug("dropping %d chunks for a closed event loop", len(items))


def _deliver(items: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
