"""Per-sender caches sized to the fleet: the process's did:key cache.

The did:key cache maps a verification method to its raw key (about 190 bytes an entry); below
the fleet size a round of heartbeats (or a re-admission storm) would decode every device's
base58 key again. The coordinator calls :func:`fit_caches` as its fleet grows (once a second,
O(1)): the bound becomes at least ``devices * SLACK`` (never shrinks).

The envelope verifier's header cache is not grown with the fleet: it keeps the hot senders
(about 1 KB an entry), and a miss costs a small JSON parse plus a did:key cache hit.
"""

from __future__ import annotations

import math

from sdk.identity.resolver import DID_KEY_CACHE_SIZE, reserve_did_key_cache

#: room above the fleet (devices that left, operators, the coordinator's peers)
SLACK = 1.1


def fleet_cache_size(devices: int, floor: int) -> int:
    """The bound for a per-sender cache of a fleet of ``devices``: ``max(floor, devices * SLACK)``."""
    return max(floor, math.ceil(max(devices, 0) * SLACK))


def fit_caches(devices: int) -> int:
    """Grow the process's did:key cache to a fleet of ``devices`` (returns its bound)."""
    return reserve_did_key_cache(fleet_cache_size(devices, DID_KEY_CACHE_SIZE))


__all__ = ["SLACK", "fit_caches", "fleet_cache_size"]
