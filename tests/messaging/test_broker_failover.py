"""Broker failover in the transport: URL lists, rotation, and a real move between two brokers."""

from __future__ import annotations

import contextlib

import pytest

from brokers.embedded import OPEN_ACL, EmbeddedBroker
from brokers.mosquitto import free_port
from sdk.identity import Key
from sdk.messaging.broker_auth import did_credentials
from sdk.messaging.transport import BrokerRotation, MqttTransport, TransportConfig, split_broker_urls
from tests.fixtures.waiting import until


def _bare(url: str) -> str:
    return url.partition("?")[0]


def test_split_broker_urls_takes_lists_and_comma_separated_strings() -> None:
    assert split_broker_urls("mqtt://a:1, mqtt://b:2,") == ["mqtt://a:1", "mqtt://b:2"]
    assert split_broker_urls(["mqtt://a:1", " mqtt://b:2 "]) == ["mqtt://a:1", "mqtt://b:2"]
    assert split_broker_urls("mqtt://a:1") == ["mqtt://a:1"]
    with pytest.raises(ValueError):
        split_broker_urls(" , ")
    with pytest.raises(TypeError):
        split_broker_urls(["mqtt://a:1", 5])  # type: ignore[list-item]


def test_rotation_is_round_robin_and_keeps_the_first_urls_options() -> None:
    rot = BrokerRotation(["mqtt://a:1", "mqtt://b:2", "mqtt://c:3"])
    cfg = TransportConfig.from_url("mqtt://a:1?keepalive=7", username="u")
    seen = []
    for _ in range(4):
        cfg = rot.advance(cfg)
        seen.append((cfg.host, cfg.port))
        assert (cfg.keepalive, cfg.username) == (7, "u")
    assert seen == [("b", 2), ("c", 3), ("a", 1), ("b", 2)]
    assert rot.switches == 4 and rot.urls == ["mqtt://a:1", "mqtt://b:2", "mqtt://c:3"]


def test_mixed_schemes_are_refused() -> None:
    with pytest.raises(ValueError, match="mix"):
        BrokerRotation(["mqtt://a:1", "mqtts://b:8883"])
    with pytest.raises(ValueError, match="mix"):
        MqttTransport("mqtt://a:1,mqtts://b:8883")


def test_a_transport_exposes_its_urls() -> None:
    t = MqttTransport(["mqtt://127.0.0.1:1883", "mqtt://127.0.0.2:1884"])
    assert t.broker_url == "mqtt://127.0.0.1:1883"
    assert t.broker_urls == ["mqtt://127.0.0.1:1883", "mqtt://127.0.0.2:1884"]
    single = MqttTransport("mqtt://127.0.0.1:1883")
    assert single.broker_urls == [single.broker_url] and single.broker_switches == 0


@pytest.mark.broker
async def test_connect_skips_an_unreachable_broker() -> None:
    key = Key.generate()
    dead = f"mqtt://127.0.0.1:{free_port()}"
    async with EmbeddedBroker(acl=OPEN_ACL) as b, \
            MqttTransport(f"{dead},{b.url}", connect_timeout=2, **did_credentials(key)) as t:
        assert t.connected and t.broker_url == _bare(b.url)
    with pytest.raises(Exception) as exc:  # every broker down: the last failure is raised
        await MqttTransport([dead, dead], connect_timeout=1).connect()
    assert getattr(exc.value, "reason", None) == "connect_failed"


@pytest.mark.broker
async def test_losing_a_broker_moves_to_the_next_and_resubscribes() -> None:
    key, peer = Key.generate(), Key.generate()
    got: list[bytes] = []
    async with EmbeddedBroker(acl=OPEN_ACL) as b1, EmbeddedBroker(acl=OPEN_ACL) as b2:
        t = MqttTransport([b1.url, b2.url], backoff_min=0.05, backoff_max=0.2, **did_credentials(key))
        async with t:
            await t.subscribe("failover/test", qos=1, handler=lambda _t, p, **_: got.append(p))
            await b1.stop()
            await until(lambda: t.connected and t.broker_url == _bare(b2.url), timeout=10)
            assert t.broker_switches >= 1 and t.reconnects == 1
            async with MqttTransport(b2.url, **did_credentials(peer)) as other:
                # the subscription is restored on b2 (a clean session there) just after CONNACK:
                # publish until a copy lands
                for _ in range(100):
                    await other.publish("failover/test", b"on b2", qos=1)
                    with contextlib.suppress(AssertionError):
                        await until(lambda: b"on b2" in got, timeout=0.1)
                        break
                assert b"on b2" in got
            await t.publish("failover/test", b"own", qos=1)  # and publishing works on the new node
