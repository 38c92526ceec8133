"""Per-peer token buckets: each peer DID may start ``rate`` requests per second, ``burst`` at once."""

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


__all__ = ["RateLimit", "PeerBuckets"]
