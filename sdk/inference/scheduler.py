"""The continuous-batching loop: one worker thread owns the model, the slot KV cache and the slots.

Each iteration it (1) applies cancellations, (2) admits waiting sequences into free slots (copying
KV of a shared prefix from the prefix cache), (3) prefills up to ``prefill_chunk_size`` prompt
tokens (long prompts take several iterations), and (4) runs ONE decode step for every decoding
slot together. Chunks go back to each consumer's asyncio queue with ``call_soon_threadsafe``;
torch releases the GIL while it computes, so the event loop stays responsive.
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

from .detokenizer import IncrementalDetokenizer, StopMatcher
from .errors import EngineClosed, EngineOverloaded, InferenceError
from .kv_cache import PrefixCache, SlotKVCache, StepContext, active_context
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
    slot: int = -1
    pos: int = 0  # tokens whose KV is in the slot
    cached_tokens: int = 0
    first_token_at: float | None = None
    done: bool = False
    matcher: Any = None  # structured output: the sequence's grammar (sdk.inference.structured.Matcher)

    @property
    def decoding(self) -> bool:
        """Prefilled, not finished, and its last sampled token not yet in the cache."""
        in_cache = len(self.prompt_ids) + len(self.generated) - 1
        return not self.done and bool(self.generated) and self.pos == in_cache

    def next_input(self) -> int:
        """The token the next decode step feeds (the last one sampled)."""
        return self.generated[-1]


class Scheduler:
    """Slots, queue and the worker thread; see the module docstring for one iteration."""

    def __init__(
        self,
        model: Any,
        *,
        cache: SlotKVCache,
        prefix_cache: PrefixCache | None,
        max_queue_size: int,
        prefill_chunk_size: int,
        kv_bucket: int = 64,
        decoder: CudaGraphDecoder | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self.prefix_cache = prefix_cache
        self.max_queue_size = max_queue_size
        self.prefill_chunk_size = prefill_chunk_size
        self.kv_bucket = kv_bucket
        self.decoder = decoder  # optional fixed-shape (CUDA graph) decode step
        self.device = cache.device
        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cancels: set[int] = set()
        self._slots: list[Sequence | None] = [None] * cache.slots
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._outbox: list[tuple[Sequence, Any]] = []
        self._rate: collections.deque[tuple[float, int]] = collections.deque()
        self.completed = 0
        self.generated_tokens = 0
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
            self._waiting.append(seq)
            self._cv.notify()

    def cancel(self, seq_id: int) -> None:
        """Ask the worker to end ``seq_id`` and free its slot at the next iteration."""
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
        """Slots with no sequence."""
        return sum(1 for s in self._slots if s is None)

    def stats(self) -> dict[str, Any]:
        """Live figures; read without locks, so momentarily approximate."""
        now = time.perf_counter()
        rate = list(self._rate)
        recent = [n for t, n in rate if now - t <= _RATE_WINDOW_S]
        span = (now - min(t for t, _ in rate if now - t <= _RATE_WINDOW_S)) if recent else 0.0
        running = [s for s in self._slots if s is not None]
        pc = self.prefix_cache
        return {
            "queue_depth": len(self._waiting),
            "active_streams": len(running),
            "max_batch_size": self.cache.slots,
            "max_sequence_length": self.cache.slot_len,
            "tokens_per_s": (sum(recent) / span) if span > 0 else 0.0,
            "free_cache_tokens": self.cache.slots * self.cache.slot_len - sum(s.pos for s in running),
            "free_slots": self.cache.slots - len(running),
            "completed_requests": self.completed,
            "generated_tokens": self.generated_tokens,
            "prefix_cache_hit_rate": pc.hit_rate if pc else 0.0,
            "prefix_cache_hits": pc.hits if pc else 0,
            "prefix_cache_lookups": pc.lookups if pc else 0,
            "prefix_cache_entries": len(pc) if pc else 0,
            "prefix_cache_tokens": pc.used_tokens if pc else 0,
        }

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self._cancels or self._busy()):
                    self._cv.wait()
                if self._stopping:
                    break
                cancels, self._cancels = self._cancels, set()
            try:
                self._apply_cancels(cancels)
                self._admit()
                with torch.inference_mode():
                    self._prefill()
                    self._decode()
            except Exception as exc:  # a failed step fails its sequences, not the engine
                log.exception("engine step failed")
                self._fail_running(InferenceError(f"generation failed: {exc}"))
            self._flush()
        self._shutdown()

    def _busy(self) -> bool:
        return any(s is not None for s in self._slots)

    def _apply_cancels(self, ids: set[int]) -> None:
        if not ids:
            return
        for waiting in list(self._waiting):
            if waiting.id in ids:
                self._waiting.remove(waiting)
                self._finish(waiting, "cancelled", "")
        for running in self._slots:
            if running is not None and running.id in ids:
                self._finish(running, "cancelled", "")

    def _admit(self) -> None:
        for slot, occupant in enumerate(self._slots):
            if occupant is not None:
                continue
            with self._cv:
                if not self._waiting:
                    return
                seq = self._waiting.popleft()
            seq.slot = slot
            self._slots[slot] = seq
            if self.prefix_cache is not None:
                entry, n = self.prefix_cache.lookup(seq.prompt_ids, limit=len(seq.prompt_ids) - 1)
                if entry is not None:
                    self.cache.write(slot, entry.k, entry.v, n)
                    seq.pos = seq.cached_tokens = n

    def _prefill(self) -> None:
        """Prefill the next prompt chunks of up to ``prefill_chunk_size`` tokens in one forward pass."""
        budget = self.prefill_chunk_size
        work: list[tuple[Sequence, int]] = []
        for seq in sorted((s for s in self._slots if s is not None), key=lambda s: s.id):
            remaining = len(seq.prompt_ids) - seq.pos
            if remaining > 0 and budget > 0:
                n = min(remaining, budget)
                work.append((seq, n))
                budget -= n
        if not work:
            return
        logits = self._forward(
            [seq.slot for seq, _ in work],
            [seq.prompt_ids[seq.pos : seq.pos + n] for seq, n in work],
            [seq.pos for seq, _ in work],
        )
        done: list[tuple[Sequence, int]] = []
        for row, (seq, n) in enumerate(work):
            seq.pos += n
            if seq.pos == len(seq.prompt_ids):
                done.append((seq, row))
        if done:
            rows = logits[[row for _, row in done]]
            masks = self._masks(self._start_masks([seq for seq, _ in done]))
            tokens = sample_rows(rows, [seq.params for seq, _ in done], [seq.generator for seq, _ in done],
                                 masks=masks)
            for (seq, _), token in zip(done, tokens, strict=True):
                self._accept(seq, token)

    def _decode(self) -> None:
        batch = [s for s in self._slots if s is not None and s.decoding]
        if not batch:
            return
        pending = self._start_masks(batch)  # grammar masks fill on the CPU while the model runs
        logits = self.decoder(batch) if self.decoder is not None else None
        if logits is None:
            inputs = [[s.next_input()] for s in batch]
            logits = self._forward([s.slot for s in batch], inputs, [s.pos for s in batch])
        tokens = sample_rows(logits, [s.params for s in batch], [s.generator for s in batch],
                             masks=self._masks(pending))
        for seq, tok in zip(batch, tokens, strict=True):
            seq.pos += 1
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
    def _forward(self, slots: list[int], tokens: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Run the model on new tokens of some slots; return each row's last-token logits [B, vocab].

        Rows shorter than the widest are padded on the left; pad tokens sit at the scratch
        position, so they write only the scratch column and no real token attends to them.
        """
        dev = self.device
        width = max(len(t) for t in tokens)
        scratch = self.cache.slot_len
        padded = [[0] * (width - len(t)) + t for t in tokens]
        pos_rows = [
            [scratch] * (width - len(t)) + list(range(p, p + len(t)))
            for t, p in zip(tokens, starts, strict=True)
        ]
        input_ids = torch.tensor(padded, dtype=torch.long, device=dev)
        positions = torch.tensor(pos_rows, dtype=torch.long, device=dev)
        end = max(p + len(t) for t, p in zip(tokens, starts, strict=True))
        kv_len = min(-(-end // self.kv_bucket) * self.kv_bucket, self.cache.slot_len + 1)
        mask = torch.arange(kv_len, device=dev)[None, None, None, :] <= positions[:, None, :, None]
        contiguous = slots == list(range(slots[0], slots[0] + len(slots)))
        rows = torch.tensor(slots, dtype=torch.long, device=dev)
        ctx = StepContext(
            cache=self.cache,
            write_rows=rows[:, None],
            positions=positions,
            kv_len=kv_len,
            mask=mask,
            row_slice=slice(slots[0], slots[0] + len(slots)) if contiguous else None,
            rows=None if contiguous else rows,
        )
        with active_context(ctx):
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
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
            self._slots[seq.slot] = None
            seq.slot = -1
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
        """Emit the last chunk with usage, store the prefix KV and free the slot."""
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
        if seq.slot >= 0:
            if self.prefix_cache is not None and seq.pos > 0:
                try:
                    self.prefix_cache.store((seq.prompt_ids + seq.generated)[: seq.pos], self.cache, seq.slot)
                except Exception:  # the cache is an optimisation; never fail a request for it
                    log.exception("could not store prefix KV")
            self._slots[seq.slot] = None
            seq.slot = -1

    def _fail_running(self, exc: BaseException) -> None:
        for seq in self._slots:
            if seq is not None:
                seq.done = True
                self._emit(seq, exc)
                self._slots[seq.slot] = None

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
