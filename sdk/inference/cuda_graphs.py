"""Opt-in CUDA-graph decode step (``EngineConfig(cuda_graphs=True)``), in the spirit of gpt-fast.

A one-token decode step over ``b`` rows with fixed-size input buffers (token ids, positions, the
block each new K/V goes to, and block tables padded to a fixed number of blocks) is captured once
per (batch bucket, block-count bucket) and replayed; idle rows write to the scratch block. The
graphs hold the KV tensors' addresses, so when the paged pool grows or shrinks (its
``generation`` changes) they are dropped and captured again on first use. Any capture or replay
failure logs a warning and returns None, and the scheduler runs the eager step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from .kv_cache import PagedKVCache, StepContext, active_context

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

    def __init__(
        self, model: Any, cache: PagedKVCache, *, max_batch_size: int, max_blocks: int, kv_bucket: int = 256,
    ) -> None:
        self.model, self.cache = model, cache
        self.max_batch, self.max_blocks = max_batch_size, max_blocks
        self.block_bucket = max(1, kv_bucket // cache.block_size)
        dev = cache.device
        rows = max_batch_size
        self.ids = torch.zeros((rows, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((rows, 1), dtype=torch.long, device=dev)
        self.write_index = torch.zeros(rows, dtype=torch.long, device=dev)
        self.tables = torch.zeros((rows, max_blocks), dtype=torch.long, device=dev)
        self.arange = torch.arange(max_blocks * cache.block_size, device=dev)
        self._host = torch.zeros((3, rows), dtype=torch.long).pin_memory()  # ids, positions, write index
        self._host_tables = torch.zeros((rows, max_blocks), dtype=torch.long).pin_memory()
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None
        self.generation = cache.generation
        self.disabled = False

    def _step(self, batch: int, blocks: int) -> torch.Tensor:
        pos = self.pos[:batch]
        mask = self.arange[: blocks * self.cache.block_size][None, None, None, :] <= pos[:, None, :, None]
        ctx = StepContext(
            cache=self.cache, write_index=self.write_index[:batch], tables=self.tables[:batch, :blocks],
            mask=mask,
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

    def _capture(self, batch: int, blocks: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        buffers = (self.ids, self.pos, self.write_index, self.tables)
        saved = [t.clone() for t in buffers]
        # Warm-up and capture runs write only the scratch block.
        self.pos.zero_()
        self.write_index.zero_()
        self.tables.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(batch, blocks)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            out = self._step(batch, blocks)
        self.pool = graph.pool()
        for buf, old in zip(buffers, saved, strict=True):
            buf.copy_(old)
        log.info("captured a CUDA graph for batch %d, %d KV blocks", batch, blocks)
        return graph, out

    def _check_generation(self) -> None:
        """Drop graphs captured against KV tensors the pool has since replaced."""
        if self.cache.generation != self.generation:
            self.graphs.clear()
            self.generation = self.cache.generation

    def warmup(self) -> int:
        """Capture the first block-count bucket for every batch bucket now; return graphs captured.

        Call it before serving (``Engine.warmup`` does): a capture, and the compile of a new batch
        shape, would otherwise stall every running stream the first time that batch size occurs.
        """
        with torch.inference_mode():  # the scheduler makes and writes the KV tensors in inference mode
            return self._warmup()

    def _warmup(self) -> int:
        self._check_generation()
        blocks = min(self.block_bucket, self.max_blocks)
        batch = 1
        while not self.disabled:
            try:
                if (batch, blocks) not in self.graphs:
                    self.graphs[(batch, blocks)] = self._capture(batch, blocks)
            except Exception:
                log.warning("CUDA graph capture failed; using the eager decode step", exc_info=True)
                self.disabled = True
            if batch >= self.max_batch:
                break
            batch = min(batch * 2, self.max_batch)
        return 0 if self.disabled else len(self.graphs)

    def __call__(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """Logits [len(seqs), vocab] for one decode step of ``seqs``, or None when graphs are off."""
        if self.disabled or len(seqs) > self.max_batch:
            return None
        bs = self.cache.block_size
        n = len(seqs)
        batch = min(1 << (n - 1).bit_length(), self.max_batch)
        end = max(s.pos for s in seqs) + 1
        blocks = min(-(-end // (bs * self.block_bucket)) * self.block_bucket, self.max_blocks)
        host, tables = self._host, self._host_tables
        host[:, :batch].zero_()
        tables[:batch, :blocks].zero_()
        for row, s in enumerate(seqs):
            host[0, row] = s.next_input()
            host[1, row] = s.pos
            host[2, row] = s.blocks[s.pos // bs] * bs + s.pos % bs
            used = s.blocks[:blocks]
            tables[row, : len(used)] = torch.tensor(used, dtype=torch.long)
        try:
            self._check_generation()
            self.ids[:batch, 0].copy_(host[0, :batch], non_blocking=True)
            self.pos[:batch, 0].copy_(host[1, :batch], non_blocking=True)
            self.write_index[:batch].copy_(host[2, :batch], non_blocking=True)
            self.tables[:batch, :blocks].copy_(tables[:batch, :blocks], non_blocking=True)
            key = (batch, blocks)
            if key not in self.graphs:
                self.graphs[key] = self._capture(batch, blocks)
            graph, out = self.graphs[key]
            graph.replay()
        except Exception:
            log.warning("CUDA graph decode failed; using the eager decode step from now on", exc_info=True)
            self.disabled = True
            return None
        return out[:n]
