"""Per-peer limits: token buckets (``rate`` requests per second, ``burst`` at once) and a cap on
concurrent streams per peer DID."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimit:
    """``rate`` requests per second refilled continuously, up to ``burst`` saved up."""

    rate: float = 5.0
    burst: float = 20.0

    def __post_init__(self) -> None:
        if not self.rate > 0 or not self.burst >= 1:
            raise ValueError("rate must be > 0 and burst >= 1")


class PeerBuckets:
    """One token bucket per peer (LRU-bounded, so a flood of new DIDs cannot grow memory)."""

    def __init__(self, limit: RateLimit, *, clock: Callable[[], float] = time.monotonic,
                 max_peers: int = 10_000) -> None:
        self.limit = limit
        self._clock = clock
        self._max = max_peers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (tokens, at)

    def allow(self, peer: str, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens from ``peer``'s bucket; False (nothing taken) when it is short."""
        now = self._clock()
        tokens, at = self._buckets.pop(peer, (self.limit.burst, now))
        tokens = min(self.limit.burst, tokens + (now - at) * self.limit.rate)
        ok = tokens >= cost
        if ok:
            tokens -= cost
        self._buckets[peer] = (tokens, now)
        if len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return ok


class PeerStreams:
    """Concurrent streams per peer, capped at ``limit`` each (only peers with a stream are kept)."""

    def __init__(self, limit: int) -> None:
        if type(limit) is not int or limit < 1:
            raise ValueError("limit must be a positive integer")
        self.limit = limit
        self._open: dict[str, int] = {}

    def full(self, peer: str) -> bool:
        return self._open.get(peer, 0) >= self.limit

    def acquire(self, peer: str) -> bool:
        """Take one of ``peer``'s slots; False (nothing taken) when it has ``limit`` already."""
        n = self._open.get(peer, 0)
        if n >= self.limit:
            return False
        self._open[peer] = n + 1
        return True

    def release(self, peer: str) -> None:
        n = self._open.get(peer, 0) - 1
        if n > 0:
            self._open[peer] = n
        else:
            self._open.pop(peer, None)

    def count(self, peer: str) -> int:
        return self._open.get(peer, 0)

    def __len__(self) -> int:
        return len(self._open)


__all__ = ["RateLimit", "PeerBuckets", "PeerStreams"]
