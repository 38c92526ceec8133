"""Per-sender caches sized to the fleet: the envelope verifier's header LRU and the did:key cache.

Both are LRUs keyed by sender; below the fleet size a round of heartbeats (or a re-admission
storm) misses on every device. The coordinator calls :func:`fit_caches` as its fleet grows
(once a second, O(1)): each bound becomes at least ``devices * SLACK`` (never shrinks).
"""

from __future__ import annotations

import math

from sdk.identity.resolver import DID_KEY_CACHE_SIZE, reserve_did_key_cache
from sdk.messaging.client import SecureClient

#: room above the fleet (devices that left, operators, the coordinator's peers)
SLACK = 1.1


def fleet_cache_size(devices: int, floor: int) -> int:
    """The bound for a per-sender cache of a fleet of ``devices``: ``max(floor, devices * SLACK)``."""
    return max(floor, math.ceil(max(devices, 0) * SLACK))


def fit_caches(client: SecureClient, devices: int) -> int:
    """Grow the client's header cache and the process's did:key cache to ``devices`` (returns the
    header cache's bound)."""
    verifier = client.verifier
    want = fleet_cache_size(devices, client.config.header_cache)
    if want > verifier.header_cache_size:
        verifier.resize_header_cache(want)
    reserve_did_key_cache(fleet_cache_size(devices, DID_KEY_CACHE_SIZE))
    return verifier.header_cache_size


__all__ = ["SLACK", "fit_caches", "fleet_cache_size"]
