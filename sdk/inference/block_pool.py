"""Bookkeeping of the paged KV cache: fixed-size blocks, reference counts and the prefix index.

Block 0 is a scratch block (pad tokens write there; never handed out); blocks ``1..capacity``
are usable. A block is *free*, *referenced* (by one or more running sequences) or *cached*
(unreferenced but registered in the prefix index under the hash of its tokens and of every
token before them, kept LRU for reuse). Only full blocks are registered, and a full block is
never written again, so sharing one needs no copy-on-write.

The pool grows on demand (geometrically, at least ``grow_blocks`` at a time) up to ``max_blocks``
and shrinks back when idle: :meth:`BlockPool.compact` keeps the most recent cached blocks, moves
them to the lowest ids and lets the storage drop the rest. The tensors themselves live in a
:class:`BlockStorage` (``sdk.inference.kv_cache.PagedKVCache``); this module imports no torch.
"""

from __future__ import annotations

import hashlib
import logging
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

log = logging.getLogger(__name__)

__all__ = ["BlockPool", "BlockStorage", "block_hash", "SCRATCH_BLOCK"]

SCRATCH_BLOCK = 0
_ROOT = b"\0" * 16


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """The prefix-index key of a full block: a digest of its parent's key and its token ids."""
    data = array("q", tokens).tobytes()
    return hashlib.blake2b((parent or _ROOT) + data, digest_size=16).digest()


class BlockStorage(Protocol):
    """Where the blocks' K/V live; the pool tells it when to grow and how to compact."""

    def resize(self, capacity: int) -> None:
        """Hold blocks ``0..capacity`` (keeping the contents of those that stay)."""
        ...

    def compact(self, keep: list[int], capacity: int) -> None:
        """Move block ``keep[i]`` to block ``i + 1`` and hold blocks ``0..capacity``."""
        ...


class BlockPool:
    """Allocates blocks to sequences, shares cached full blocks by hash, evicts them LRU."""

    def __init__(
        self, *, block_size: int, max_blocks: int, storage: BlockStorage | None = None,
        initial_blocks: int = 0, grow_blocks: int = 64, cache_blocks: int = 0,
    ) -> None:
        if block_size < 1 or max_blocks < 1:
            raise ValueError("block_size and max_blocks must be >= 1")
        self.block_size = block_size
        self.max_blocks = max_blocks
        self.grow_blocks = max(1, grow_blocks)
        self.cache_blocks = max(0, cache_blocks)  # unreferenced cached blocks kept before reuse
        self.storage = storage
        self.capacity = 0
        self._refs: list[int] = [0]
        self._free: list[int] = []
        self._key: dict[int, bytes] = {}  # cached block -> its hash
        self._index: dict[bytes, int] = {}  # hash -> block
        self._parent: dict[int, bytes] = {}  # cached block -> its parent's hash (_ROOT for the first)
        self._tokens: dict[int, tuple[int, ...]] = {}  # cached block -> its token ids
        self._children: dict[bytes, dict[int, None]] = {}  # parent hash -> its cached child blocks
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks, oldest first
        self.referenced = 0
        self.grows = 0
        self.shrinks = 0
        self.evictions = 0
        self.lookups = 0
        self.hits = 0
        self.lookup_tokens = 0
        self.hit_tokens = 0
        self._set_capacity(min(max(0, initial_blocks), max_blocks))

    # ------------------------------------------------------------------ sizes
    @property
    def free_blocks(self) -> int:
        """Blocks neither referenced nor cached, within the current capacity."""
        return len(self._free)

    @property
    def cached_blocks(self) -> int:
        """Blocks registered in the prefix index (referenced or not)."""
        return len(self._key)

    @property
    def evictable_blocks(self) -> int:
        """Cached blocks no sequence references (reusable after eviction)."""
        return len(self._lru)

    def available(self) -> int:
        """Blocks an allocation could get now: free, evictable, and room to grow."""
        return len(self._free) + len(self._lru) + (self.max_blocks - self.capacity)

    def refcount(self, block: int) -> int:
        """How many sequences hold ``block``."""
        return self._refs[block]

    # ------------------------------------------------------------------ allocation
    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh blocks (reference count 1), or None (nothing taken) when they do not fit."""
        if n <= 0:
            return []
        if self.available() < n:
            return None
        out: list[int] = []
        while len(out) < n:
            if not self._free and not self._make_room(n - len(out)):
                self._free.extend(reversed(out))
                for block in out:
                    self._refs[block] = 0
                return None
            block = self._free.pop()
            self._refs[block] = 1
            out.append(block)
        self.referenced += n
        return out

    def _make_room(self, wanted: int) -> bool:
        """Put at least one block on the free list: evict past the cache bound, else grow, else
        evict. False when nothing can be freed (the storage failed to grow and nothing is cached)."""
        if self._lru and (len(self._lru) > self.cache_blocks or self.capacity >= self.max_blocks):
            self._evict(next(iter(self._lru)))
            return True
        if self.capacity < self.max_blocks:
            grow = max(wanted, self.grow_blocks, self.capacity // 2)
            try:
                self._set_capacity(min(self.max_blocks, self.capacity + grow))
            except Exception:  # e.g. the device ran out of memory: stop growing here
                log.warning("KV pool could not grow past %d blocks; that is its limit now", self.capacity,
                            exc_info=True)
                self.max_blocks = self.capacity
                return self._make_room(wanted) if self._lru else False
            self.grows += 1
            return True
        return False

    def _evict(self, block: int) -> None:
        del self._lru[block]
        self._unindex(block)
        self._free.append(block)
        self.evictions += 1

    def _unindex(self, block: int) -> None:
        del self._index[self._key.pop(block)]
        parent = self._parent.pop(block)
        del self._tokens[block]
        siblings = self._children[parent]
        del siblings[block]
        if not siblings:
            del self._children[parent]

    def _set_capacity(self, capacity: int) -> None:
        if capacity == self.capacity:
            return
        if self.storage is not None:
            self.storage.resize(capacity)
        if capacity > self.capacity:
            self._refs.extend([0] * (capacity - self.capacity))
            self._free.extend(range(capacity, self.capacity, -1))  # low ids are popped first
        self.capacity = capacity
        log.debug("KV pool capacity %d blocks", capacity)

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced cached blocks stay cached (LRU).

        Pass a block table in order: its tail is queued for eviction before its head, so a
        prefix is never evicted while a longer one that needs it stays."""
        for block in reversed(blocks):
            refs = self._refs[block] - 1
            if refs < 0:
                raise ValueError(f"block {block} freed more often than it was taken")
            self._refs[block] = refs
            if refs == 0:
                self.referenced -= 1
                if block in self._key:
                    self._lru[block] = None
                else:
                    self._free.append(block)

    # ------------------------------------------------------------------ prefix index
    def register(self, block: int, key: bytes, parent: bytes | None, tokens: Sequence[int]) -> bool:
        """Record the referenced full ``block`` (its ``tokens`` following the block keyed
        ``parent``) under ``key``; False when the key is already held."""
        if key in self._index or block in self._key:
            return False
        self._index[key] = block
        self._key[block] = key
        self._parent[block] = parent or _ROOT
        self._tokens[block] = tuple(tokens)
        self._children.setdefault(parent or _ROOT, {})[block] = None
        return True

    def match(self, tokens: Sequence[int], *, limit: int) -> tuple[list[int], list[bytes], tuple[int, int]]:
        """Take the cached blocks holding the longest prefix of ``tokens`` (at most ``limit`` tokens).

        Returns the full blocks (one more reference each) with their keys, and ``(block, n)``: a
        cached block whose first ``n`` tokens continue the match (also referenced; copy those
        positions into a fresh block, then :meth:`free` it), or ``(0, 0)``. Give every block back
        with :meth:`free`; :meth:`record` counts a lookup once it is used."""
        bs = self.block_size
        limit = min(max(0, limit), len(tokens))
        blocks: list[int] = []
        keys: list[bytes] = []
        parent: bytes | None = None
        for i in range(limit // bs):
            key = block_hash(parent, tokens[i * bs : (i + 1) * bs])
            block = self._index.get(key)
            if block is None:
                break
            blocks.append(block)
            keys.append(key)
            parent = key
        partial, best = SCRATCH_BLOCK, 0
        start = len(blocks) * bs
        rest = tokens[start : min(start + bs, limit)]
        for child in self._children.get(parent or _ROOT, {}) if rest else ():
            cached = self._tokens[child]
            n = 0
            while n < len(rest) and cached[n] == rest[n]:
                n += 1
            if n > best:
                partial, best = child, n
        for block in [*blocks, partial] if best else blocks:
            if self._refs[block] == 0:
                del self._lru[block]
                self.referenced += 1
            self._refs[block] += 1
        return blocks, keys, (partial, best)

    def record(self, lookup_tokens: int, hit_tokens: int) -> None:
        """Count one prefix lookup of ``lookup_tokens`` tokens, ``hit_tokens`` of them served cached."""
        self.lookups += 1
        self.lookup_tokens += lookup_tokens
        if hit_tokens:
            self.hits += 1
            self.hit_tokens += hit_tokens

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens served from cached blocks."""
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    # ------------------------------------------------------------------ shrinking
    def compact(self, *, keep_cached: int, min_capacity: int = 0) -> bool:
        """Shrink to the ``keep_cached`` most recent cached blocks (or ``min_capacity``); only
        while no block is referenced. Returns True when the capacity changed."""
        if self.referenced:
            return False
        keep = list(self._lru)[max(0, len(self._lru) - keep_cached):] if keep_cached > 0 else []
        target = min(self.max_blocks, max(len(keep), min_capacity))
        if target >= self.capacity:
            return False
        meta = [(self._key[b], self._parent[b], self._tokens[b]) for b in keep]
        if self.storage is not None:
            self.storage.compact(keep, target)
        self.evictions += len(self._lru) - len(keep)
        self._refs = [0] * (target + 1)
        self._key, self._index, self._lru = {}, {}, OrderedDict()
        self._parent, self._tokens, self._children = {}, {}, {}
        for new, (key, parent, tokens) in enumerate(meta, start=1):
            self.register(new, key, parent, tokens)
            self._lru[new] = None
        self._free = list(range(target, len(keep), -1))
        self.capacity = target
        self.shrinks += 1
        log.debug("KV pool shrunk to %d blocks (%d cached kept)", target, len(keep))
        return True
