"""What an unauthenticated ``hello`` may cost: per-sender rate limits and a signing budget.

A ``hello`` arrives before the sender has proved any credential, so it must stay cheap: the
coordinator signs its own presentation for a hello only while a global budget allows it (known
devices, which proved a credential before, are not charged), each sender gets a small burst of
handshake requests, and a hello without a nonce costs no presentation at all (the coordinator
then proves itself in the ``present`` reply, after the device has).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; :meth:`take` spends one if there is one."""

    __slots__ = ("_at", "_clock", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if rate < 0 or burst < 1:
            raise ValueError("rate must be >= 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        """Spend a token; False when the bucket is empty."""
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class SenderLimiter:
    """One :class:`TokenBucket` per sender, at most ``max_senders`` tracked (least recent dropped)."""

    def __init__(self, rate: float, burst: float, *, max_senders: int = 50_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_senders = max_senders
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, sender: str) -> bool:
        """True when ``sender`` may make one more request now."""
        bucket = self._buckets.get(sender)
        if bucket is None:
            bucket = self._buckets[sender] = TokenBucket(self.rate, self.burst, clock=self._clock)
            while len(self._buckets) > self.max_senders:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(sender)
        return bucket.take()


__all__ = ["TokenBucket", "SenderLimiter"]
