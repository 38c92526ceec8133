"""Seen-message-id cache, bounded in time (the freshness window) and in memory (max entries)."""

from __future__ import annotations

import logging
from hashlib import blake2b as _blake2b

from sdk.messaging.errors import Replayed

logger = logging.getLogger(__name__)


class ReplayCache:
    """Remembers ``(sender, id)`` pairs for ``window`` seconds after their issued-at.

    Messages older than the window are rejected by the freshness check before they get here,
    so forgetting them is safe. When full, the oldest entry is evicted and its issued-at becomes
    a floor: anything issued at or before the floor is rejected as ``replayed``, since the
    cache can no longer prove it fresh (fails closed under flooding).

    A pair is kept as a 60-bit BLAKE2b digest of sender and id (length-prefixed, so no two
    pairs share an encoding), a small int, not as the id string and a tuple: about 95 bytes an
    entry with its expiry, was ~180. A digest collision can only refuse a message (as a replay),
    never accept one; ids are random, so another sender cannot aim one at a message not yet sent.
    """

    def __init__(self, *, window: float = 330.0, max_entries: int = 100_000) -> None:
        if window <= 0 or max_entries <= 0:
            raise ValueError("window and max_entries must be positive")
        self.window = window
        self.max_entries = max_entries
        self._seen: dict[int, float] = {}  # pair digest -> expiry; insertion order ~ arrival order
        self._floor = float("-inf")
        self._last_purge = float("-inf")

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_add(self, sender: str, msg_id: str, *, issued_at: float, now: float) -> None:
        """Record the pair, or raise :class:`Replayed` if it was seen (or cannot be proved new)."""
        key = _pair_key(sender, msg_id)
        if key in self._seen:
            raise Replayed(f"message id {msg_id!r} from {sender} already seen")
        if issued_at <= self._floor:
            raise Replayed(f"message {msg_id!r} issued before the replay cache floor (cache overflow)")
        if now - self._last_purge > 1.0 or len(self._seen) >= self.max_entries:
            self._purge(now)
        while len(self._seen) >= self.max_entries:
            old_key = next(iter(self._seen))
            old_iat = self._seen.pop(old_key) - self.window
            if old_iat > self._floor:
                self._floor = old_iat
                logger.warning("replay cache full (%d): raising floor to %.3f", self.max_entries, old_iat)
        self._seen[key] = issued_at + self.window

    def _purge(self, now: float) -> None:
        self._last_purge = now
        seen = self._seen
        while seen:
            key = next(iter(seen))
            if seen[key] > now:
                break
            del seen[key]


def _pair_key(sender: str, msg_id: str) -> int:
    """60 bits naming ``(sender, msg_id)``: BLAKE2b of the sender's length, the sender and the id
    (an int below 2**60 is one 32-byte object)."""
    digest = _blake2b(f"{len(sender)}:{sender}{msg_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 4


__all__ = ["ReplayCache"]
