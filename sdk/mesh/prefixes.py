"""Prefix affinity: keyed hashes of block-aligned prompt prefixes, held by nodes, matched by routers.

A prompt is serialized canonically (chat messages one JSON line each, a text prompt as UTF-8,
token ids as 4-byte integers) and cut into blocks of ``block`` bytes; block *i*'s hash is an
HMAC-SHA256 over block *i* chained on block *i-1*'s hash, truncated to 8 bytes. Two prompts
share their first *n* hashes exactly when they share their first *n* blocks, so the next turn
of a chat (earlier messages + the reply + a new message) matches the blocks of the turn before.

Nodes keep an LRU of the chains they served (prompt and reply) and advertise the most recent
hashes (:class:`PrefixSummary`, bounded); routers keep their own map of where they sent each
chain (:class:`AffinityMap`). The HMAC key is the mesh's ``prefix_key``
(:func:`derive_prefix_key` from a secret shared by the mesh's nodes and routers), so the broker,
which sees the adverts, cannot test guesses of prompt text against them; without a key a node
advertises no summary and a router uses a random key for its own map only.

The router has no tokenizer: blocks are over the prompt's bytes, not its tokens. A cached byte
prefix is a cached token prefix up to the last token boundary inside it, so the match is a
close lower bound of what the engine's prefix cache reuses.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sdk.identity.hazmat.b64 import b64url_decode, b64url_encode
from sdk.mesh.capacity import AdvertFieldError

HASH_BYTES = 8
MAX_SUMMARY = 1024  # hashes an advert may carry
MAX_BLOCKS = 512  # blocks hashed per prompt (a longer prompt matches on its first MAX_BLOCKS blocks)
DEFAULT_BLOCK = 128
_MIN_BLOCK, _MAX_BLOCK = 16, 65536
_DOMAIN = b"autoglm-prefix-v1"


def derive_prefix_key(secret: bytes | str, *, mesh: str = "autoglm") -> bytes:
    """A 32-byte prefix key for ``mesh`` from a shared secret (HKDF-SHA256 extract + expand)."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(raw) < 16:
        raise ValueError("the prefix secret must be at least 16 bytes")
    prk = hmac.new(_DOMAIN, raw, hashlib.sha256).digest()
    return hmac.new(prk, b"prefix-key:" + mesh.encode() + b"\x01", hashlib.sha256).digest()


def prompt_bytes(*, prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None,
                 prompt_token_ids: Sequence[int] | None = None) -> bytes:
    """The canonical bytes of a prompt (what blocks are cut from)."""
    if prompt_token_ids is not None:
        return b"i\n" + b"".join(int(t).to_bytes(4, "big", signed=False) for t in prompt_token_ids)
    if messages is not None:
        return b"m\n" + b"".join(message_bytes(m) for m in messages)
    return b"t\n" + (prompt or "").encode("utf-8", "surrogatepass")


def message_bytes(message: Mapping[str, Any]) -> bytes:
    """One chat message as a canonical JSON line."""
    return json.dumps(dict(message), sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str).encode("utf-8", "surrogatepass") + b"\n"


def continuation(base: bytes, reply: str) -> bytes:
    """The bytes a follow-up prompt starts with: the prompt plus the reply (as a message for chats)."""
    if base.startswith(b"m\n"):
        return base + message_bytes({"role": "assistant", "content": reply})
    if base.startswith(b"t\n"):
        return base + reply.encode("utf-8", "surrogatepass")
    return base


class PrefixHasher:
    """Cuts canonical prompt bytes into blocks and hashes the chain under ``key``."""

    def __init__(self, key: bytes | None = None, *, block: int = DEFAULT_BLOCK) -> None:
        if not _MIN_BLOCK <= block <= _MAX_BLOCK:
            raise ValueError(f"block must be in [{_MIN_BLOCK}, {_MAX_BLOCK}] bytes")
        self.keyed = key is not None
        self.key = key if key is not None else os.urandom(32)
        if len(self.key) < 16:
            raise ValueError("prefix_key must be at least 16 bytes")
        self.block = block

    def chain(self, data: bytes) -> list[bytes]:
        """The hashes of ``data``'s whole blocks (at most :data:`MAX_BLOCKS`)."""
        out: list[bytes] = []
        prev = _DOMAIN
        n = min(len(data) // self.block, MAX_BLOCKS)
        for i in range(n):
            prev = hmac.new(self.key, prev + data[i * self.block:(i + 1) * self.block], hashlib.sha256).digest()[:HASH_BYTES]
            out.append(prev)
        return out

    def request_chain(self, req: Any) -> list[bytes]:
        """The chain of a ``GenerationRequest`` (or request body fields with the same names)."""
        get = req.get if isinstance(req, Mapping) else lambda k: getattr(req, k, None)
        return self.chain(prompt_bytes(prompt=get("prompt"), messages=get("messages"),
                                       prompt_token_ids=get("prompt_token_ids")))


@dataclass(frozen=True)
class PrefixSummary:
    """What a node advertises: its block size and the hashes it holds (most recent first)."""

    block: int
    hashes: frozenset[bytes]
    ordered: tuple[bytes, ...] = ()

    def to_body(self) -> dict[str, Any]:
        return {"block": self.block, "hashes": b64url_encode(b"".join(self.ordered)).decode()}

    @classmethod
    def from_body(cls, body: Any) -> PrefixSummary | None:
        """The advert's ``prefixes`` (None when absent); :class:`AdvertFieldError` when malformed."""
        if body is None:
            return None
        if not isinstance(body, dict) or set(body) != {"block", "hashes"}:
            raise AdvertFieldError("prefixes", "must be an object with exactly block and hashes")
        block = body["block"]
        if type(block) is not int or not _MIN_BLOCK <= block <= _MAX_BLOCK:
            raise AdvertFieldError("prefixes.block", f"must be an integer in [{_MIN_BLOCK}, {_MAX_BLOCK}]")
        limit = -(-MAX_SUMMARY * HASH_BYTES * 4 // 3)
        try:
            raw = b64url_decode(body["hashes"], max_len=limit)
        except ValueError as exc:
            raise AdvertFieldError("prefixes.hashes", str(exc)) from None
        if len(raw) % HASH_BYTES:
            raise AdvertFieldError("prefixes.hashes", f"length must be a multiple of {HASH_BYTES} bytes")
        ordered = tuple(raw[i:i + HASH_BYTES] for i in range(0, len(raw), HASH_BYTES))
        return cls(block, frozenset(ordered), ordered)

    def depth(self, chain: Sequence[bytes]) -> int:
        """Leading blocks of ``chain`` this node holds."""
        n = 0
        for h in chain:
            if h not in self.hashes:
                break
            n += 1
        return n


class PrefixIndex:
    """A node's LRU of the prefix hashes it served (a stand-in for what its engine has cached)."""

    def __init__(self, hasher: PrefixHasher, *, capacity: int = 4096, advertise: int = 512) -> None:
        if capacity < 1 or not 0 <= advertise <= MAX_SUMMARY:
            raise ValueError(f"capacity must be >= 1 and advertise in [0, {MAX_SUMMARY}]")
        self.hasher = hasher
        self.capacity = capacity
        self.advertise = advertise
        self._lru: OrderedDict[bytes, None] = OrderedDict()
        self.lookups = 0
        self.blocks_asked = 0
        self.blocks_hit = 0

    def lookup(self, chain: Sequence[bytes]) -> int:
        """Leading blocks of ``chain`` held (counted in the hit rate)."""
        n = 0
        for h in chain:
            if h not in self._lru:
                break
            n += 1
        self.lookups += 1
        self.blocks_asked += len(chain)
        self.blocks_hit += n
        return n

    def add(self, chain: Iterable[bytes]) -> None:
        """Hold ``chain`` (most recent last; the oldest hashes fall out past ``capacity``)."""
        for h in chain:
            self._lru[h] = None
            self._lru.move_to_end(h)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    @property
    def hit_rate(self) -> float:
        """Prompt blocks found / prompt blocks asked, since start."""
        return self.blocks_hit / self.blocks_asked if self.blocks_asked else 0.0

    def summary(self) -> PrefixSummary | None:
        """The most recent hashes to advertise (None without a mesh key: nothing to share)."""
        if not self.hasher.keyed or not self.advertise:
            return None
        recent = tuple(reversed(list(self._lru)[-self.advertise:]))
        return PrefixSummary(self.hasher.block, frozenset(recent), recent)

    def __len__(self) -> int:
        return len(self._lru)


class AffinityMap:
    """A router's record of which nodes it sent each prefix block to (bounded LRU)."""

    def __init__(self, *, capacity: int = 65536, per_hash: int = 4) -> None:
        self.capacity = capacity
        self.per_hash = per_hash
        self._map: OrderedDict[bytes, tuple[str, ...]] = OrderedDict()

    def record(self, chain: Iterable[bytes], node_id: str) -> None:
        for h in chain:
            held = tuple(n for n in self._map.get(h, ()) if n != node_id)
            self._map[h] = (*held, node_id)[-self.per_hash:]
            self._map.move_to_end(h)
        while len(self._map) > self.capacity:
            self._map.popitem(last=False)

    def depth(self, chain: Sequence[bytes], node_id: str) -> int:
        """Leading blocks of ``chain`` this router last sent to ``node_id``."""
        for i in range(len(chain) - 1, -1, -1):
            if node_id in self._map.get(chain[i], ()):
                return i + 1
        return 0

    def forget(self, node_id: str) -> None:
        """Drop a node (it died or restarted: its cache is gone)."""
        for h, nodes in list(self._map.items()):
            if node_id in nodes:
                rest = tuple(n for n in nodes if n != node_id)
                if rest:
                    self._map[h] = rest
                else:
                    del self._map[h]

    def __len__(self) -> int:
        return len(self._map)


__all__ = ["AffinityMap", "PrefixHasher", "PrefixIndex", "PrefixSummary", "continuation", "derive_prefix_key",
           "message_bytes", "prompt_bytes", "DEFAULT_BLOCK", "MAX_SUMMARY"]
