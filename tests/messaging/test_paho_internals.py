"""The paho internals the transport leans on exist in the installed paho, and each has a fallback."""

from __future__ import annotations

import logging
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties

from sdk.messaging import paho_internals as pi


def test_installed_paho_has_every_internal_the_fast_path_uses(caplog: pytest.LogCaptureFixture) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    with caplog.at_level(logging.WARNING, logger=pi.__name__):
        assert pi.queued_packets(client) == 0
        assert pi.in_callback(client) is False
        assert pi.packet_reader(client) is not None
        assert pi.socket_of(client) is None
        pi.set_max_inflight(client, 7)
    assert client._max_inflight_messages == 7
    assert not caplog.records  # no fallback was needed


def test_fallbacks_are_safe_when_paho_renames_its_internals(caplog: pytest.LogCaptureFixture) -> None:
    class Bare:
        reads = 0

        def loop_read(self) -> None:
            self.reads += 1

    bare = Bare()
    with caplog.at_level(logging.WARNING, logger=pi.__name__):
        assert pi.queued_packets(bare) == 2  # the batched (always correct) write path
        assert pi.in_callback(bare) is True  # defer writes rather than re-enter paho
        assert pi.packet_reader(bare) is None  # read with loop_read()
        pi.handle_read_error(bare, 1)
        pi.set_max_inflight(bare, 3)
        pi.forget_socket(bare, object())
    assert bare.reads == 1
    assert any("falls back" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------- shared Properties tables


class OriginalProperties(Properties):
    """paho's Properties exactly as shipped: its own __init__ (fresh tables) and clear()."""

    __init__ = pi.original_properties_init
    clear = pi.original_properties_clear


#: a valid value for each of paho's property types (index into Properties.types)
SAMPLES: dict[int, Any] = {0: 1, 1: 7, 2: 123456, 3: 300, 4: b"\x00\x01corr", 5: "h\u00e9llo/topic",
                           6: ("k\u00e9y", "value")}
MULTIPLES: dict[str, list[Any]] = {"UserProperty": [("a", "1"), ("a", "2"), ("", "")],
                                   "SubscriptionIdentifier": [1, 300, 268435455]}


def _set_props(packet_type: int) -> dict[str, Any]:
    """Every property that applies to ``packet_type`` with a sample value (names compressed)."""
    probe = OriginalProperties(packet_type)
    values: dict[str, Any] = {}
    for name, ident in probe.names.items():
        kind, packets = probe.properties[ident]
        if packet_type in packets:
            compressed = name.replace(" ", "")
            values[compressed] = MULTIPLES.get(compressed, SAMPLES[kind])
    return values


def _props(cls: type[Properties], packet_type: int, values: dict[str, Any]) -> Properties:
    p = cls(packet_type)
    for name, value in values.items():
        if name in MULTIPLES:
            for one in value:  # one at a time: paho appends to the list
                setattr(p, name, one)
        else:
            setattr(p, name, value)
    return p


def _set_attrs(p: Properties) -> dict[str, Any]:
    return {k: v for k, v in vars(p).items() if k not in ("packetType", "types", "names", "properties")}


def test_properties_share_tables_once_the_transport_is_imported() -> None:
    import sdk.messaging.transport  # noqa: F401 - applies it

    assert pi.properties_shared()
    assert pi.share_property_tables() is True  # idempotent
    assert Properties.__init__ is not pi.original_properties_init
    a, b = Properties(PacketTypes.PUBLISH), Properties(PacketTypes.PUBACK)
    assert a.names is b.names and a.properties is b.properties and a.types is b.types


@pytest.mark.parametrize("packet_type", pi.PROPERTY_PACKET_TYPES)
def test_new_instances_equal_the_original_implementation(packet_type: int) -> None:
    assert vars(Properties(packet_type)) == vars(OriginalProperties(packet_type))


@pytest.mark.parametrize("packet_type", pi.PROPERTY_PACKET_TYPES)
def test_pack_unpack_round_trips_like_the_original(packet_type: int) -> None:
    values = _set_props(packet_type)
    fast, orig = _props(Properties, packet_type, values), _props(OriginalProperties, packet_type, values)
    assert _set_attrs(fast) == _set_attrs(orig) == values
    wire = orig.pack()
    assert fast.pack() == wire
    assert str(fast) == str(orig) and fast.json() == orig.json() and fast.isEmpty() is orig.isEmpty()
    # unpack into fresh instances and into ones that already hold other values (unpack clears first)
    for target_fast, target_orig in ((Properties(packet_type), OriginalProperties(packet_type)),
                                     (_props(Properties, packet_type, values),
                                      _props(OriginalProperties, packet_type, values))):
        got_fast, n_fast = target_fast.unpack(wire)
        got_orig, n_orig = target_orig.unpack(wire)
        assert n_fast == n_orig == len(wire)
        assert _set_attrs(got_fast) == _set_attrs(got_orig) == _set_attrs(orig)
        assert got_fast.pack() == wire
    # the shared tables are still exactly what paho builds
    assert vars(Properties(packet_type)) == vars(OriginalProperties(packet_type))


def test_clear_removes_exactly_the_set_properties() -> None:
    values = _set_props(PacketTypes.CONNACK)
    assert len(values) > 15
    fast, orig = _props(Properties, PacketTypes.CONNACK, values), _props(OriginalProperties, PacketTypes.CONNACK, values)
    for p in (fast, orig):
        object.__setattr__(p, "note", "not a property")  # clear() leaves non-property attributes alone
        p.clear()
        assert _set_attrs(p) == {"note": "not a property"}
        assert p.isEmpty() and p.pack() == b"\x00"
    assert vars(fast) == vars(orig)
    empty = Properties(PacketTypes.PUBLISH)
    empty.clear()
    assert vars(empty) == vars(OriginalProperties(PacketTypes.PUBLISH))


def test_instances_do_not_share_set_properties() -> None:
    a: Any = Properties(PacketTypes.PUBLISH)
    b: Any = Properties(PacketTypes.PUBLISH)
    a.UserProperty = ("a", "1")
    a.ResponseTopic = "r/a"
    assert not hasattr(b, "UserProperty") and not hasattr(b, "ResponseTopic")
    b.UserProperty = ("b", "2")
    assert a.UserProperty == [("a", "1")] and b.UserProperty == [("b", "2")]
    a.clear()
    assert b.UserProperty == [("b", "2")] and not hasattr(a, "UserProperty")
    with pytest.raises(MQTTException):  # validation is paho's own, unchanged
        a.ReceiveMaximum = 5  # not a PUBLISH property


@pytest.mark.parametrize("change", ["version", "layout"])
def test_an_unknown_paho_is_left_alone(change: str, monkeypatch: pytest.MonkeyPatch,
                                       caplog: pytest.LogCaptureFixture) -> None:
    import paho.mqtt

    pi.restore_property_tables()
    try:
        assert not pi.properties_shared()
        if change == "version":
            monkeypatch.setattr(paho.mqtt, "__version__", "3.0.0")
        else:
            def init_with_more(self: Any, packet_type: int) -> None:
                pi.original_properties_init(self, packet_type)
                object.__setattr__(self, "cache", {})

            monkeypatch.setattr(pi, "original_properties_init", init_with_more)
        monkeypatch.setattr(pi, "_warned", set())
        with caplog.at_level(logging.WARNING, logger=pi.__name__):
            assert pi.share_property_tables() is False
            assert pi.share_property_tables() is False
        assert Properties.__init__ is OriginalProperties.__init__
        assert Properties.clear is OriginalProperties.clear
        assert [r.getMessage() for r in caplog.records if "Properties layout" in r.getMessage()] != []
        assert len(caplog.records) == 1  # logged once
    finally:
        monkeypatch.undo()
        assert pi.share_property_tables() is True


# ---------------------------------------------------------------- one Condition for every MQTTMessageInfo


def test_message_infos_share_one_condition_and_each_waiter_wakes_for_its_own_message() -> None:
    import threading

    assert pi.share_publish_conditions() and pi.publish_conditions_shared()
    infos = [paho.MQTTMessageInfo(mid) for mid in range(1, 4)]
    assert len({id(i._condition) for i in infos}) == 1          # noqa: SLF001 - one, not one each
    assert [i.mid for i in infos] == [1, 2, 3] and not any(i.is_published() for i in infos)
    woke: list[int] = []

    def wait(info: paho.MQTTMessageInfo) -> None:
        info.wait_for_publish(timeout=10)
        woke.append(info.mid)

    threads = [threading.Thread(target=wait, args=(i,)) for i in infos]
    for t in threads:
        t.start()
    infos[1]._set_as_published()                                 # noqa: SLF001 - as paho does on PUBACK
    threads[1].join(10)
    assert woke == [2]                                            # only its own waiter returned
    assert threads[0].is_alive() and threads[2].is_alive()
    for i in (infos[0], infos[2]):
        i._set_as_published()                                    # noqa: SLF001
    for t in threads:
        t.join(10)
    assert sorted(woke) == [1, 2, 3] and all(i.is_published() for i in infos)


def test_publish_conditions_are_left_alone_for_an_unknown_paho(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    pi.restore_publish_conditions()
    try:
        assert not pi.publish_conditions_shared()
        import paho.mqtt as paho_mqtt

        monkeypatch.setattr(paho_mqtt, "__version__", "3.0.0")
        monkeypatch.setattr(pi, "_warned", set())
        with caplog.at_level(logging.WARNING, logger=pi.__name__):
            assert pi.share_publish_conditions() is False
        assert not pi.publish_conditions_shared()
        assert any("MQTTMessageInfo" in r.getMessage() for r in caplog.records)
        a, b = paho.MQTTMessageInfo(1), paho.MQTTMessageInfo(2)
        assert a._condition is not b._condition                  # noqa: SLF001 - paho's own again
    finally:
        monkeypatch.undo()
        assert pi.share_publish_conditions()


def test_an_empty_callback_lookup_is_skipped_and_a_later_callback_still_found() -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    assert pi.skip_empty_callback_lookup(client)
    assert list(client._on_message_filtered.iter_match("a/b/c")) == []      # noqa: SLF001
    seen: list[str] = []
    client.message_callback_add("a/+/c", lambda c, u, m: seen.append(m.topic))
    assert len(list(client._on_message_filtered.iter_match("a/b/c"))) == 1  # noqa: SLF001
    assert list(client._on_message_filtered.iter_match("a/b/d")) == []      # noqa: SLF001
    assert pi.skip_empty_callback_lookup(client) is False     # in use: left as it is
