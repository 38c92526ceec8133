"""What an unauthenticated ``hello`` may cost: per-sender rate limits and a signing budget.

A ``hello`` arrives before the sender has proved any credential, so it must stay cheap: the
coordinator signs its own presentation for a hello only while a global budget allows it (known
devices, which proved a credential before, are not charged), each sender gets a small burst of
handshake requests, and a hello without a nonce costs no presentation at all (the coordinator
then proves itself in the ``present`` reply, after the device has).

Under a storm (every device of a fleet re-connecting at once) :class:`AdmissionControl` bounds
the handshakes in flight: a ``hello`` takes a slot until its ``present`` is handled (or the slot
times out), a direct presentation (over its own request's id, no hello) while it is handled;
beyond ``max_inflight`` either is refused ``busy`` with a retry-after hint estimated from the
recent admission rate, so the work queued behind the coordinator stays bounded and every refused
device comes back later (nobody is dropped). A resumed admission (the single-use
``next_challenge``) needs no hello and no slot: one round trip, no presentation signed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
Row = TypeVar("Row")


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


class AdmissionControl:
    """At most ``max_inflight`` handshakes in flight (from ``hello`` to ``present``, or a direct
    ``present`` being handled); counters for operators.

    ``begin(did)`` takes a slot (False when full: answer ``busy`` with :meth:`retry_after`);
    ``finish(did)`` releases it when the present was handled, admitted or not. A slot not
    finished within ``slot_ttl`` seconds (the device went away) is released on the next call.
    Every operation is O(1) amortised.
    """

    #: the admission rate behind a retry-after hint is measured over this many seconds ...
    RATE_WINDOW = 2.0
    #: ... or over this many, when that is faster (a coordinator that has just begun finishing
    #: handshakes: its first seconds' average would send refused devices away for too long)
    RECENT_WINDOW = 0.5
    #: the rate assumed while none is measured, and the least one assumed while the handshakes
    #: finished span less than :attr:`RATE_WINDOW` (a cold start: a hint too long idles the
    #: coordinator, one too short costs only another cheap refusal)
    ASSUMED_RATE = 100.0

    def __init__(self, max_inflight: int = 256, *, slot_ttl: float = 10.0, max_hint: float = 5.0,
                 unknown_share: float = 0.75, clock: Callable[[], float] = time.monotonic) -> None:
        if max_inflight < 1 or slot_ttl <= 0 or max_hint <= 0 or not 0 < unknown_share <= 1:
            raise ValueError("max_inflight must be >= 1, slot_ttl and max_hint > 0, 0 < unknown_share <= 1")
        self._unknown: set[str] = set()         # slot holders never admitted before
        self._unknown_cap = max(1, int(max_inflight * unknown_share))
        self.max_inflight = max_inflight
        self.slot_ttl = slot_ttl
        self.max_hint = max_hint
        self._clock = clock
        self._slots: OrderedDict[str, float] = OrderedDict()     # did -> deadline, oldest first
        self._done_at: deque[float] = deque(maxlen=8192)        # when recent handshakes finished
        self._busy_at: deque[float] = deque(maxlen=8192)        # when recent hellos were refused
        self._run_began = float("-inf")                         # the current run of admissions began
        #: the most handshakes in flight at once
        self.peak = 0
        #: hellos refused busy
        self.busy = 0
        #: handshakes finished (present handled after a hello)
        self.finished = 0
        #: slots released because their present never came
        self.expired = 0
        #: admissions by resumption ticket (no hello, no slot)
        self.resumed = 0
        #: first admissions by a direct presentation (no hello)
        self.direct = 0
        #: presentations the coordinator signed for handshakes
        self.signed = 0

    @property
    def inflight(self) -> int:
        self._expire(self._clock())
        return len(self._slots)

    def begin(self, did: str, *, known: bool = True) -> bool:
        """Take a slot for ``did`` (one per DID: a repeated hello renews it); False when full.

        Senders never admitted (``known=False``) share at most ``unknown_share`` of the slots, so
        a flood of fresh DIDs cannot keep the fleet's own devices out."""
        now = self._clock()
        self._expire(now)
        if did in self._slots:
            self._slots.move_to_end(did)
        elif len(self._slots) >= self.max_inflight or (not known and len(self._unknown) >= self._unknown_cap):
            self.busy += 1
            self._busy_at.append(now)
            return False
        elif not known:
            self._unknown.add(did)
        self._slots[did] = now + self.slot_ttl
        self.peak = max(self.peak, len(self._slots))
        return True

    def finish(self, did: str) -> bool:
        """Release ``did``'s slot; False when it held none (a resumed or unsolicited present)."""
        if self._slots.pop(did, None) is None:
            return False
        self._unknown.discard(did)
        self.finished += 1
        now = self._clock()
        done = self._done_at
        if not done or done[-1] < now - self.RATE_WINDOW:
            self._run_began = now               # the first handshake finished after a quiet window
        done.append(now)
        return True

    def rate(self) -> float | None:
        """Handshakes finished per second over the last :attr:`RATE_WINDOW`, or over the last
        :attr:`RECENT_WINDOW` when that is faster, and at least :attr:`ASSUMED_RATE` until the
        handshakes have been finishing for a whole window (None: too few)."""
        now = self._clock()
        done = self._done_at
        self._trim(done, now)
        if len(done) < 4:
            return None
        rate = len(done) / max(now - done[0], 0.05)
        if now - self._run_began < self.RATE_WINDOW:
            rate = max(rate, self.ASSUMED_RATE)     # a cold start: not measured yet
        recent, since = 0, now - self.RECENT_WINDOW
        for at in reversed(done):           # newest first: at most the last half second's
            if at < since:
                break
            recent += 1
        return max(rate, recent / self.RECENT_WINDOW) if recent >= 4 else rate

    def retry_after(self) -> float:
        """When a refused device should come back: the devices refused lately, queued behind each
        other at the recent admission rate (0.05 s to ``max_hint``; see :meth:`rate`)."""
        rate = self.rate() or self.ASSUMED_RATE
        self._trim(self._busy_at, self._clock())
        return min(self.max_hint, max(0.05, len(self._busy_at) / rate))

    def _trim(self, times: deque[float], now: float) -> None:
        while times and times[0] < now - self.RATE_WINDOW:
            times.popleft()

    def snapshot(self) -> dict[str, int]:
        """The counters, for status output and benchmarks."""
        return {"inflight": self.inflight, "max_inflight": self.max_inflight, "peak": self.peak,
                "busy": self.busy, "finished": self.finished, "expired": self.expired,
                "resumed": self.resumed, "direct": self.direct, "signed": self.signed}

    def _expire(self, now: float) -> None:
        while self._slots:
            did, deadline = next(iter(self._slots.items()))
            if deadline > now:
                return
            del self._slots[did]
            self._unknown.discard(did)
            self.expired += 1


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

    def forget(self, sender: str) -> None:
        """Drop ``sender``'s bucket (it was admitted: known devices are not rate limited here)."""
        self._buckets.pop(sender, None)


class WriteBatch(Generic[Row]):
    """Rows written together: ``await batch.write(row)`` returns once ``row`` is durable.

    Rows added in the same event-loop turn (at most ``max_rows``) go to ``flush(rows)`` in one
    call, meant to be one transaction, run on the next turn: an admission arriving with a
    thousand others costs one commit, not a thousand, and waits for nothing else. Every waiter
    of a batch shares one future; a failed flush raises its error in each of them, so none of
    them goes on as if written. A waiter that is cancelled leaves the batch intact.
    """

    def __init__(self, flush: Callable[[list[Row]], None], *, max_rows: int = 1024) -> None:
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self._flush = flush
        self.max_rows = max_rows
        self._rows: list[Row] = []
        self._done: asyncio.Future[None] | None = None
        self._handle: asyncio.Handle | None = None
        #: batches flushed, rows written, the largest batch
        self.batches = 0
        self.rows = 0
        self.largest = 0

    def __len__(self) -> int:
        """Rows waiting for the next flush."""
        return len(self._rows)

    async def write(self, row: Row) -> None:
        """Add ``row`` to the open batch and wait until the batch is flushed (raises its error)."""
        if self._done is None:
            loop = asyncio.get_running_loop()
            self._done = loop.create_future()
            self._handle = loop.call_soon(self.flush)
        done = self._done
        self._rows.append(row)
        if len(self._rows) >= self.max_rows:
            self.flush()
        await asyncio.shield(done)

    def flush(self) -> None:
        """Write the open batch now (the loop does it on the next turn)."""
        rows, done, self._rows, self._done = self._rows, self._done, [], None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if done is None:
            return
        try:
            self._flush(rows)
        except Exception as exc:  # noqa: BLE001 - every waiter gets the error
            log.error("batch of %d row(s) not written: %s", len(rows), exc)
            done.set_exception(exc)
            return
        self.batches += 1
        self.rows += len(rows)
        self.largest = max(self.largest, len(rows))
        done.set_result(None)

    def discard(self) -> int:
        """Drop the open batch unwritten (the process is going down): its waiters are cancelled,
        so none of them answers as if written."""
        rows, done, self._rows, self._done = self._rows, self._done, [], None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if done is not None:
            done.cancel()
        return len(rows)


__all__ = ["AdmissionControl", "TokenBucket", "SenderLimiter", "WriteBatch"]
