import pytest

from sdk.mesh.adverts import AdvertTable, NodeAdvert, NodeLoad


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def ad(node="n1", seq=1, epoch=1.0, did="did:key:zA", online=True, models=("m",), interval=2.0):
    return NodeAdvert(node_id=node, did=did, epoch=epoch, seq=seq, models=models, online=online, interval_s=interval)


def test_out_of_order_and_stale_adverts_are_ignored():
    table = AdvertTable(clock=Clock())
    assert table.apply(ad(seq=5))
    assert not table.apply(ad(seq=4))
    assert not table.apply(ad(seq=5))
    assert table.apply(ad(seq=6))
    assert table.get("n1").seq == 6


def test_restart_starts_new_sequence():
    table = AdvertTable(clock=Clock())
    table.apply(ad(seq=50, epoch=1.0))
    assert table.apply(ad(seq=1, epoch=2.0))
    assert not table.apply(ad(seq=99, epoch=1.0))  # the old boot's late copy


def test_other_key_cannot_take_over_running_node():
    table = AdvertTable(clock=Clock())
    table.apply(ad(seq=1, did="did:key:zA"))
    assert not table.apply(ad(seq=2, did="did:key:zEvil"))
    assert table.get("n1").did == "did:key:zA"


def test_death_notice_and_staleness_remove_node():
    clock = Clock()
    table = AdvertTable(clock=clock, stale_after=3.0)
    table.apply(ad(node="a", seq=1))
    table.apply(ad(node="b", seq=1))
    assert table.apply(ad(node="a", seq=2, online=False))
    assert [n.node_id for n in table.live()] == ["b"]
    clock.t += 7.0  # > 3 x 2 s interval
    assert table.live() == []


def test_filter_by_model_and_uptime():
    clock = Clock()
    table = AdvertTable(clock=clock)
    table.apply(ad(node="a", models=("x",)))
    table.apply(ad(node="b", models=("y",)))
    clock.t += 1.5
    table.apply(ad(node="a", seq=2, models=("x",)))
    assert [n.node_id for n in table.live("x")] == ["a"]
    assert table.uptime("a") == pytest.approx(1.5)


def test_body_round_trip_and_malformed():
    original = ad(seq=3)
    original = NodeAdvert(**{**original.__dict__, "load": NodeLoad(queue_depth=2, active_streams=3, max_batch_size=4)})
    parsed = NodeAdvert.from_body(original.to_body())
    assert parsed == original
    assert parsed.load.utilisation == pytest.approx(1.25)
    with pytest.raises(ValueError):
        NodeAdvert.from_body({"node": "x"})
    with pytest.raises(ValueError):
        NodeAdvert.from_body("nope")


def test_other_key_cannot_take_over_with_a_higher_epoch():
    clock = Clock()
    table = AdvertTable(clock=clock, stale_after=3.0)
    table.apply(ad(seq=1, epoch=1.0, did="did:key:zA"))
    assert not table.apply(ad(seq=1, epoch=99.0, did="did:key:zEvil"))
    assert not table.apply(ad(seq=1, epoch=99.0, did="did:key:zEvil", online=False))  # nor kill it
    assert table.get("n1").did == "did:key:zA"
    clock.t += 7.0  # the holder went stale: the id is free again
    assert table.apply(ad(seq=1, epoch=99.0, did="did:key:zB"))
    assert table.get("n1").did == "did:key:zB"
