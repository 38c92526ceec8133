"""KV storage for the scheduler: a preallocated per-slot cache, the attention function that reads
and writes it, and an LRU prefix cache of finished sequences' KV.

The model runs its own projections, RoPE and MLP; only attention is swapped (through transformers'
``AttentionInterface``) for :func:`slot_attention`, which writes each new key/value at its slot row
and position and attends over that slot's cached prefix. Rows of one batch may sit at different
positions, so batched slots of different lengths need no padding on the left.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

from sdk.errors import InferenceError

log = logging.getLogger(__name__)

__all__ = [
    "ATTN_IMPLEMENTATION",
    "SlotKVCache",
    "StepContext",
    "PrefixCache",
    "install_slot_attention",
    "active_context",
]

ATTN_IMPLEMENTATION = "autoglm_slots"
_LOCAL = threading.local()


@dataclass
class StepContext:
    """What one forward pass needs from the cache: rows, positions, visible length and mask."""

    cache: SlotKVCache
    write_rows: torch.Tensor  # [B, 1] slot index of each batch row
    positions: torch.Tensor  # [B, T] position of each new token
    kv_len: int  # cached positions visible to attention (a bucketed length)
    mask: torch.Tensor  # [B, 1, T, kv_len] bool, True = may attend
    row_slice: slice | None = None  # rows are slots start..stop (no gather needed)
    rows: torch.Tensor | None = None  # [B] slot indices when not a slice


class active_context:
    """Makes ``ctx`` the cache context of forward passes run in this thread."""

    def __init__(self, ctx: StepContext) -> None:
        self._ctx = ctx

    def __enter__(self) -> StepContext:
        _LOCAL.ctx = self._ctx
        return self._ctx

    def __exit__(self, *exc: object) -> None:
        _LOCAL.ctx = None


@torch.compiler.disable
def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Write the new K/V into the slot cache, attend over the slot's prefix; plain SDPA otherwise."""
    ctx: StepContext | None = getattr(_LOCAL, "ctx", None)
    if ctx is None:  # the model used outside the engine (e.g. model.generate in a benchmark)
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    layer = cast(int, module.layer_idx)
    kc, vc = ctx.cache.k[layer], ctx.cache.v[layer]
    kc[ctx.write_rows, :, ctx.positions] = key.transpose(1, 2).to(kc.dtype)
    vc[ctx.write_rows, :, ctx.positions] = value.transpose(1, 2).to(vc.dtype)
    if ctx.row_slice is not None:
        keys, values = kc[ctx.row_slice, :, : ctx.kv_len], vc[ctx.row_slice, :, : ctx.kv_len]
    else:
        assert ctx.rows is not None  # set whenever row_slice is not
        keys = kc[:, :, : ctx.kv_len].index_select(0, ctx.rows)
        values = vc[:, :, : ctx.kv_len].index_select(0, ctx.rows)
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=ctx.mask, scale=scaling, enable_gqa=query.shape[1] != keys.shape[1]
    )
    return out.transpose(1, 2).contiguous(), None


def install_slot_attention(model: Any) -> None:
    """Register :func:`slot_attention` and switch ``model`` to it (SDPA when no engine step runs)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, slot_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:  # noqa: SLF001 - transformers' own field
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:  # noqa: SLF001
        raise InferenceError(
            f"{type(model).__name__} does not support a custom attention implementation",
            reason="unsupported_model",
        )


class SlotKVCache:
    """K and V tensors [slots, kv_heads, slot_len + 1, head_dim] per layer, allocated once.

    Position ``slot_len`` is a scratch column that idle rows of a fixed-shape batch write to.
    """

    def __init__(
        self, *, layers: int, slots: int, slot_len: int, kv_heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        shape = (slots, kv_heads, slot_len + 1, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.slots, self.slot_len, self.device = slots, slot_len, device

    @staticmethod
    def bytes_per_token(*, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of K+V one cached token takes."""
        return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def read(self, slot: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the first ``length`` positions of a slot: [layers, kv_heads, length, head_dim]."""
        k = torch.stack([t[slot, :, :length] for t in self.k])
        v = torch.stack([t[slot, :, :length] for t in self.v])
        return k, v

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        """Copy the first ``length`` positions of stored K/V into a slot."""
        for i, (kc, vc) in enumerate(zip(self.k, self.v, strict=True)):
            kc[slot, :, :length].copy_(k[i, :, :length])
            vc[slot, :, :length].copy_(v[i, :, :length])


@dataclass
class _PrefixEntry:
    tokens: torch.Tensor  # int64 [L] on CPU
    k: torch.Tensor
    v: torch.Tensor


class PrefixCache:
    """LRU of token sequences with their KV; a new prompt reuses the longest common prefix."""

    def __init__(self, capacity_tokens: int, *, min_tokens: int = 16) -> None:
        self.capacity_tokens = capacity_tokens
        self.min_tokens = min_tokens
        self._entries: OrderedDict[int, _PrefixEntry] = OrderedDict()
        self._next_id = 0
        self.used_tokens = 0
        self.lookups = 0
        self.hits = 0
        self.lookup_tokens = 0
        self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _common(a: torch.Tensor, b: torch.Tensor) -> int:
        n = min(a.numel(), b.numel())
        if n == 0:
            return 0
        diff = (a[:n] != b[:n]).nonzero()
        return int(diff[0, 0]) if diff.numel() else n

    def lookup(self, ids: list[int], *, limit: int) -> tuple[_PrefixEntry | None, int]:
        """Best entry and how many leading tokens (at most ``limit``) it covers; counts the hit rate."""
        self.lookups += 1
        self.lookup_tokens += len(ids)
        if not self._entries or limit < self.min_tokens:
            return None, 0
        query = torch.tensor(ids, dtype=torch.long)
        best_key, best_n = None, 0
        for key, entry in self._entries.items():
            n = self._common(entry.tokens, query)
            if n > best_n:
                best_key, best_n = key, n
        best_n = min(best_n, limit)
        if best_key is None or best_n < self.min_tokens:
            return None, 0
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.hit_tokens += best_n
        return self._entries[best_key], best_n

    def store(self, ids: list[int], cache: SlotKVCache, slot: int) -> None:
        """Keep the KV of ``ids`` (already in ``slot``) unless an entry already covers it."""
        n = len(ids)
        if n < self.min_tokens or n > self.capacity_tokens:
            return
        tokens = torch.tensor(ids, dtype=torch.long)
        for key, entry in list(self._entries.items()):
            common = self._common(entry.tokens, tokens)
            if common == n:  # already covered by a longer (or equal) entry
                self._entries.move_to_end(key)
                return
            if common == entry.tokens.numel():  # the old entry is a prefix of the new one
                self._drop(key)
        while self._entries and self.used_tokens + n > self.capacity_tokens:
            self._drop(next(iter(self._entries)))
        k, v = cache.read(slot, n)
        self._entries[self._next_id] = _PrefixEntry(tokens, k, v)
        self._next_id += 1
        self.used_tokens += n

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.used_tokens -= entry.tokens.numel()

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens served from the cache."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0
