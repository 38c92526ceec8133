"""Node ranking: the Open-AutoGLM composite score as weighted z-scores.

Each candidate node is described by a few observed figures; each figure is turned into a
z-score across the candidates (so units do not matter), signed so that higher is better, and
the weighted sum ranks the nodes. The parts are kept so operators can see why a node won.
Each part's spread has a floor (absolute for load and stability, relative to the mean for
throughput and latency) so noise between near-identical nodes does not count as a whole sigma.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RankingWeights:
    """Weights of the score's parts (any non-negative numbers; only ratios matter)."""

    throughput: float = 1.0
    stability: float = 1.0
    load: float = 1.5
    latency: float = 1.0

    def __post_init__(self) -> None:
        for name in ("throughput", "stability", "load", "latency"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
                raise ValueError(f"ranking weight {name!r} must be a non-negative number, got {value!r}")


@dataclass(frozen=True)
class NodeFigures:
    """What the router knows about one node when it ranks."""

    node_id: str
    tokens_per_s: float = 0.0  # recent decode throughput the node reports
    error_rate: float = 0.0  # failed / attempted requests the router observed (0..1)
    uptime_s: float = 0.0  # how long the node has been advertising without a gap
    load: float = 0.0  # (queue depth + active streams) / capacity (0 = idle, 1 = full)
    latency_s: float | None = None  # router-observed time to first token (None: never used)


@dataclass(frozen=True)
class RankedNode:
    """A node with its composite score and the z-scored parts behind it."""

    node_id: str
    score: float
    parts: dict[str, float] = field(default_factory=dict)


def _zscores(values: Sequence[float], *, floor: float = 0.0, relative_floor: float = 0.0) -> list[float]:
    """z-scores whose spread is at least ``floor`` (absolute) and ``relative_floor`` x |mean|, so
    differences that are noise (two idle twins, 3% throughput jitter) do not become a whole sigma."""
    n = len(values)
    if n == 0:
        return []
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n
    std = max(math.sqrt(var), floor, relative_floor * abs(mean))
    if std < 1e-12:
        return [0.0] * n
    return [(v - mean) / std for v in values]


def rank_nodes(nodes: Sequence[NodeFigures], weights: RankingWeights | None = None) -> list[RankedNode]:
    """Rank ``nodes`` best first. Ties keep a stable order (by node id)."""
    w = weights or RankingWeights()
    if not nodes:
        return []
    # Stability folds error rate (lower better) and uptime (log scale: the first minutes matter most).
    stability = [-(f.error_rate * 10.0) + math.log1p(max(f.uptime_s, 0.0)) / 5.0 for f in nodes]
    known_latencies = [f.latency_s for f in nodes if f.latency_s is not None]
    default_latency = sum(known_latencies) / len(known_latencies) if known_latencies else 0.0
    latency = [-(f.latency_s if f.latency_s is not None else default_latency) for f in nodes]
    z_tp = _zscores([f.tokens_per_s for f in nodes], relative_floor=0.25)
    z_st = _zscores(stability, floor=0.1)
    z_ld = _zscores([-f.load for f in nodes], floor=0.1)
    z_lt = _zscores(latency, relative_floor=0.25)
    ranked = []
    for i, f in enumerate(nodes):
        parts = {
            "throughput": w.throughput * z_tp[i],
            "stability": w.stability * z_st[i],
            "load": w.load * z_ld[i],
            "latency": w.latency * z_lt[i],
        }
        ranked.append(RankedNode(f.node_id, sum(parts.values()), parts))
    ranked.sort(key=lambda r: (-r.score, r.node_id))
    return ranked


__all__ = ["RankingWeights", "NodeFigures", "RankedNode", "rank_nodes"]
