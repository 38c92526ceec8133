"""Opt-in CUDA-graph decode step (``EngineConfig(cuda_graphs=True)``), in the spirit of gpt-fast.

A decode step over slots ``0..b-1`` with fixed-size input buffers is captured once per
(batch bucket, KV-length bucket) and replayed; idle rows write to the cache's scratch column. Any
capture or replay failure logs a warning and returns None, and the scheduler runs the eager step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from .kv_cache import SlotKVCache, StepContext, active_context

if TYPE_CHECKING:
    from .scheduler import Sequence

log = logging.getLogger(__name__)

__all__ = ["CudaGraphDecoder", "compile_pointwise_modules"]

_FUSABLE_SUFFIXES = ("RMSNorm", "MLP", "Attention")


def compile_pointwise_modules(model: torch.nn.Module) -> int:
    """``torch.compile`` the norm, MLP and attention modules so element-wise ops fuse; return how many.

    Inside a CUDA graph every kernel still costs a few microseconds, and an unfused RMSNorm or
    RoPE is several of them. The slot-cache attention itself is excluded from compilation (a graph
    break). On any failure the modules are restored and 0 is returned. The change stays on the
    model after the engine closes.
    """
    patched: list[tuple[torch.nn.Module, Any]] = []
    for module in model.modules():
        if type(module).__name__.endswith(_FUSABLE_SUFFIXES) and "forward" not in module.__dict__:
            patched.append((module, module.forward))
            module.forward = torch.compile(module.forward, dynamic=None)
    if not patched:
        return 0
    try:
        device = next(model.parameters()).device
        with torch.inference_mode():
            model(input_ids=torch.zeros((1, 2), dtype=torch.long, device=device), use_cache=False)
    except Exception:
        log.warning("torch.compile of norm/MLP modules failed; running them eagerly", exc_info=True)
        for module, _ in patched:
            del module.forward
        return 0
    log.info("compiled %d norm/MLP modules", len(patched))
    return len(patched)


class CudaGraphDecoder:
    """Replays captured one-token decode steps; ``__call__`` returns logits rows or None (fall back)."""

    def __init__(self, model: Any, cache: SlotKVCache, *, kv_bucket: int = 256) -> None:
        self.model, self.cache, self.kv_bucket = model, cache, kv_bucket
        dev = cache.device
        slots = cache.slots
        self.ids = torch.zeros((slots, 1), dtype=torch.long, device=dev)
        self.pos = torch.full((slots, 1), cache.slot_len, dtype=torch.long, device=dev)
        self.rows = torch.arange(slots, device=dev)[:, None]
        self.arange = torch.arange(cache.slot_len + 1, device=dev)
        self._host = torch.zeros((2, slots, 1), dtype=torch.long).pin_memory()  # ids, positions
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None
        self.disabled = False

    def _step(self, batch: int, kv_len: int) -> torch.Tensor:
        pos = self.pos[:batch]
        mask = self.arange[:kv_len][None, None, None, :] <= pos[:, None, :, None]
        ctx = StepContext(
            cache=self.cache, write_rows=self.rows[:batch], positions=pos, kv_len=kv_len, mask=mask,
            row_slice=slice(0, batch),
        )
        with active_context(ctx):
            out = self.model(
                input_ids=self.ids[:batch],
                attention_mask=mask,
                position_ids=pos,
                use_cache=False,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :]

    def _capture(self, batch: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        saved_ids, saved_pos = self.ids.clone(), self.pos.clone()
        self.pos.fill_(self.cache.slot_len)  # warm-up and capture runs write only the scratch column
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(batch, kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._step(batch, kv_len)
        self.pool = graph.pool()
        self.ids.copy_(saved_ids)
        self.pos.copy_(saved_pos)
        log.info("captured a CUDA graph for batch %d, kv length %d", batch, kv_len)
        return graph, out

    def warmup(self) -> int:
        """Capture the first KV-length bucket for every batch bucket now; return graphs captured.

        Call it before serving (``Engine.warmup`` does): a capture, and the compile of a new batch
        shape, would otherwise stall every running stream the first time that batch size occurs.
        """
        kv_len = min(self.kv_bucket, self.cache.slot_len + 1)
        batch = 1
        while not self.disabled:
            try:
                if (batch, kv_len) not in self.graphs:
                    self.graphs[(batch, kv_len)] = self._capture(batch, kv_len)
            except Exception:
                log.warning("CUDA graph capture failed; using the eager decode step", exc_info=True)
                self.disabled = True
            if batch >= self.cache.slots:
                break
            batch = min(batch * 2, self.cache.slots)
        return 0 if self.disabled else len(self.graphs)

    def __call__(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Logits [len(seqs), vocab] for one decode step of ``seqs``, or None when graphs are off."""
        if self.disabled:
            return None
        top = max(s.slot for s in seqs) + 1
        batch = 1 << (top - 1).bit_length()
        batch = min(batch, self.cache.slots)
        end = max(s.pos for s in seqs) + 1
        kv_len = min(-(-end // self.kv_bucket) * self.kv_bucket, self.cache.slot_len + 1)
        ids = [0] * batch
        pos = [self.cache.slot_len] * batch
        for s in seqs:
            ids[s.slot] = s.next_input()
            pos[s.slot] = s.pos
        try:
            self._host[0, :batch, 0] = torch.tensor(ids)
            self._host[1, :batch, 0] = torch.tensor(pos)
            self.ids[:batch].copy_(self._host[0, :batch], non_blocking=True)
            self.pos[:batch].copy_(self._host[1, :batch], non_blocking=True)
            key = (batch, kv_len)
            if key not in self.graphs:
                self.graphs[key] = self._capture(batch, kv_len)
            graph, out = self.graphs[key]
            graph.replay()
        except Exception:
            log.warning("CUDA graph decode failed; using the eager decode step from now on", exc_info=True)
            self.disabled = True
            return None
        slots = [s.slot for s in seqs]
        if slots == list(range(len(slots))):
            return out[: len(slots)]
        return out.index_select(0, torch.tensor(slots, device=out.device))
