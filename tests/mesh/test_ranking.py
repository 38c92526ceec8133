import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdk.mesh.ranking import NodeFigures, RankingWeights, rank_nodes


def test_idle_fast_node_beats_loaded_slow_node():
    fast = NodeFigures("a", tokens_per_s=100, load=0.1, uptime_s=600, latency_s=0.05)
    slow = NodeFigures("b", tokens_per_s=20, load=0.9, uptime_s=600, latency_s=0.5)
    ranked = rank_nodes([slow, fast])
    assert [r.node_id for r in ranked] == ["a", "b"]
    assert ranked[0].score > ranked[1].score
    assert set(ranked[0].parts) == {"throughput", "stability", "load", "latency"}


def test_load_dominates_when_weighted():
    busy_fast = NodeFigures("a", tokens_per_s=100, load=1.0)
    idle_slow = NodeFigures("b", tokens_per_s=90, load=0.0)
    by_tp = rank_nodes([busy_fast, idle_slow], RankingWeights(throughput=1, stability=0, load=0, latency=0))
    by_load = rank_nodes([busy_fast, idle_slow], RankingWeights(throughput=1, stability=0, load=5, latency=0))
    assert by_tp[0].node_id == "a"
    assert by_load[0].node_id == "b"


def test_errors_lower_stability():
    ok = NodeFigures("a", error_rate=0.0, uptime_s=100)
    flaky = NodeFigures("b", error_rate=0.5, uptime_s=100)
    ranked = rank_nodes([flaky, ok], RankingWeights(throughput=0, stability=1, load=0, latency=0))
    assert ranked[0].node_id == "a"
    assert ranked[0].parts["stability"] > 0 > ranked[1].parts["stability"]


def test_single_node_and_empty():
    assert rank_nodes([]) == []
    (only,) = rank_nodes([NodeFigures("x", tokens_per_s=5)])
    assert only.node_id == "x" and only.score == 0.0


def test_bad_weight_rejected():
    with pytest.raises(ValueError):
        RankingWeights(load=-1)


@given(st.lists(st.tuples(st.floats(0, 1e4), st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=12))
def test_scores_are_finite_and_sorted(rows):
    nodes = [NodeFigures(f"n{i}", tokens_per_s=t, error_rate=e, load=ld) for i, (t, e, ld) in enumerate(rows)]
    ranked = rank_nodes(nodes)
    assert len(ranked) == len(nodes)
    assert all(math.isfinite(r.score) for r in ranked)
    assert all(ranked[i].score >= ranked[i + 1].score for i in range(len(ranked) - 1))
