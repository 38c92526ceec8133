"""Paged KV storage for the scheduler and the attention function that reads and writes it.

Per layer, K and V live in tensors ``[capacity + 1, block_size, kv_heads, head_dim]`` (block 0 is
scratch); a sequence owns a list of blocks (its block table, see :mod:`sdk.inference.block_pool`).
The model runs its own projections, RoPE and MLP; only attention is swapped (through transformers'
``AttentionInterface``) for :func:`paged_attention`, which writes each new key/value at its
(block, offset), gathers every row's blocks and attends over them with SDPA. Rows of one batch
may have different lengths (the mask hides what lies past each row's position).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from sdk.errors import InferenceError

log = logging.getLogger(__name__)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "PagedKVCache",
    "StepContext",
    "active_context",
    "install_paged_attention",
    "paged_attention",
    "release_free_heap",
]

ATTN_IMPLEMENTATION = "autoglm_paged"
_LOCAL = threading.local()


@dataclass
class StepContext:
    """What one forward pass needs from the cache: where new K/V go, each row's blocks, the mask."""

    cache: PagedKVCache
    write_index: torch.Tensor  # [B*T] block * block_size + offset of each new token (row-major)
    tables: torch.Tensor  # [B, nb] each row's blocks in order (padded with the scratch block)
    mask: torch.Tensor  # [B, 1, T, nb * block_size] bool, True = may attend


class active_context:
    """Makes ``ctx`` the cache context of forward passes run in this thread."""

    def __init__(self, ctx: StepContext) -> None:
        self._ctx = ctx

    def __enter__(self) -> StepContext:
        _LOCAL.ctx = self._ctx
        return self._ctx

    def __exit__(self, *exc: object) -> None:
        _LOCAL.ctx = None


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Write the new K/V into their blocks, attend over each row's blocks; plain SDPA otherwise."""
    ctx: StepContext | None = getattr(_LOCAL, "ctx", None)
    if ctx is None:  # the model used outside the engine (e.g. model.generate in a benchmark)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    layer = cast(int, module.layer_idx)
    kc, vc = ctx.cache.k[layer], ctx.cache.v[layer]
    batch, kv_heads, _, head_dim = key.shape
    # index_copy_/index_select over flat views: on CPU several times faster than indexing with
    # (block, offset) pairs or a 2-D table (docs/BENCHMARKS.md, KV cache).
    kc.view(-1, kv_heads, head_dim).index_copy_(
        0, ctx.write_index, key.transpose(1, 2).reshape(-1, kv_heads, head_dim).to(kc.dtype))
    vc.view(-1, kv_heads, head_dim).index_copy_(
        0, ctx.write_index, value.transpose(1, 2).reshape(-1, kv_heads, head_dim).to(vc.dtype))
    flat_tables = ctx.tables.reshape(-1)
    keys = kc.index_select(0, flat_tables).view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    values = vc.index_select(0, flat_tables).view(batch, -1, kv_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=ctx.mask, scale=scaling, enable_gqa=query.shape[1] != kv_heads
    )
    return out.transpose(1, 2).contiguous(), None


def install_paged_attention(model: Any) -> None:
    """Register :func:`paged_attention` and switch ``model`` to it (SDPA when no engine step runs)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    # Excluded from torch.compile (a graph break); wrapped here, not at import, since
    # torch.compiler.disable imports torch._dynamo (and sympy), which a native model never needs.
    AttentionInterface.register(ATTN_IMPLEMENTATION, torch.compiler.disable(paged_attention))
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:  # noqa: SLF001 - transformers' own field
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:  # noqa: SLF001
        raise InferenceError(
            f"{type(model).__name__} does not support a custom attention implementation",
            reason="unsupported_model",
        )


class PagedKVCache:
    """The block tensors of every layer; grows, shrinks and compacts when the block pool says so.

    New blocks are zeroed (a masked position must still hold a finite number: SDPA multiplies
    its zero weight by the value). ``generation`` counts reallocations, so holders of tensor
    addresses (captured CUDA graphs) know when to drop them.
    """

    def __init__(
        self, *, layers: int, kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.block_size, self.dtype, self.device = block_size, dtype, device
        self.k: list[torch.Tensor] = [self._empty(0) for _ in range(layers)]
        self.v: list[torch.Tensor] = [self._empty(0) for _ in range(layers)]
        self.capacity = 0
        self.generation = 0

    @staticmethod
    def bytes_per_token(*, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of K+V one cached token takes."""
        return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def bytes_per_block(self) -> int:
        """Bytes of K+V one block takes across all layers."""
        return self.block_size * self.bytes_per_token(
            layers=self.layers, kv_heads=self.kv_heads, head_dim=self.head_dim, dtype=self.dtype)

    @property
    def nbytes(self) -> int:
        """Bytes the block tensors hold now (scratch block included)."""
        return (self.capacity + 1) * self.bytes_per_block

    def _empty(self, capacity: int) -> torch.Tensor:
        shape = (capacity + 1, self.block_size, self.kv_heads, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _replace(self, build: Any, capacity: int) -> None:
        """Rebuild every layer's tensors one layer at a time (so at most one layer is held twice)."""
        for tensors in (self.k, self.v):
            for i, old in enumerate(tensors):
                tensors[i] = build(old)
                del old
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
        self.capacity = capacity
        self.generation += 1

    def resize(self, capacity: int) -> None:
        """Hold blocks ``0..capacity``, keeping the contents of the blocks that stay."""
        def build(old: torch.Tensor) -> torch.Tensor:
            new = self._empty(capacity)
            n = min(old.shape[0], new.shape[0])
            new[:n].copy_(old[:n])
            return new

        self._replace(build, capacity)

    def compact(self, keep: list[int], capacity: int) -> None:
        """Move block ``keep[i]`` to ``i + 1`` and hold blocks ``0..capacity``."""
        index = torch.tensor([0, *keep], dtype=torch.long, device=self.device)

        def build(old: torch.Tensor) -> torch.Tensor:
            new = self._empty(capacity)
            new[: index.numel()].copy_(old.index_select(0, index))
            return new

        self._replace(build, capacity)
        if self.device.type == "cpu":
            release_free_heap()

    def copy_block(self, src: int, dst: int, n: int) -> None:
        """Copy the first ``n`` positions of block ``src`` into block ``dst`` in every layer."""
        for tensors in (self.k, self.v):
            for t in tensors:
                t[dst, :n].copy_(t[src, :n])


def release_free_heap() -> bool:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``); False where unavailable.

    Block tensors of a few MB each come from the C heap, which keeps freed memory for reuse, so
    without this a shrunk pool would not lower the process's RSS.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False
