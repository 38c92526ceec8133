"""Per-subscription inbound policy on real brokers: retained state vs messages, senders, encryption,
request expiry and gates (sdk.messaging.policy)."""

from __future__ import annotations

import asyncio
import time

import pytest

from sdk.identity import Key
from sdk.messaging import Message, RemoteError, Retained, SecureClient
from sdk.messaging.envelope import Signer
from sdk.messaging.errors import RejectedMessage
from sdk.messaging.policy import InboundPolicy
from sdk.messaging.transport import MqttTransport
from tests.fixtures.waiting import until

pytestmark = pytest.mark.broker




def _topic(name: str) -> str:
    return f"autoglm/v1/test/{name}/{time.monotonic_ns()}"


async def _raw(broker, key: Key) -> MqttTransport:
    t = MqttTransport(broker.url, **broker.credentials(key))
    await t.connect()
    return t


async def test_retained_copy_of_a_request_never_runs(broker) -> None:
    node_key, user_key, attacker = Key.generate(), Key.generate(), Key.generate()
    topic = _topic("req")
    calls: list[Message] = []
    captured: list[bytes] = []
    async with SecureClient(broker.url, node_key) as node, SecureClient(broker.url, user_key) as user:
        spy = await _raw(broker, attacker)
        try:
            await spy.subscribe(topic, qos=1, handler=lambda t, p, **kw: captured.append(bytes(p)))
            await node.serve(topic, lambda m: (calls.append(m), "ok")[1])
            assert (await user.request(topic, "once", timeout=10)).body == "ok"
            await until(lambda: len(captured) == 1)
            await spy.publish(topic, captured[0], qos=1, retain=True)  # replayed with the retain flag
            # live subscribers get it with the flag cleared (MQTT): the replay cache refuses it
            await until(lambda: node.stats.rejected["replayed"] >= 1)
            # a server that subscribes later gets the retained copy at SUBSCRIBE: it must not run either
            async with SecureClient(broker.url, node_key) as late:
                late_calls: list[Message] = []
                await late.serve(topic, late_calls.append)
                await until(lambda: late.stats.retained_dropped >= 1)
                assert late_calls == []
            assert [m.body for m in calls] == ["once"]
        finally:
            await spy.publish(topic, b"", qos=1, retain=True)
            await spy.aclose()


async def test_old_retained_message_is_refused_on_a_message_topic(broker) -> None:
    sender, reader = Key.generate(), Key.generate()
    topic = _topic("old")
    _, wire = Signer(sender).seal(topic, "stale", type="event", now=time.time() - 400)
    _, fresh = Signer(sender).seal(topic, "fresh", type="event")
    raw = await _raw(broker, sender)
    try:
        await raw.publish(topic, wire, qos=1, retain=True)
        async with SecureClient(broker.url, reader) as client:
            got: list[Message] = []
            await client.subscribe(topic, got.append)
            await until(lambda: client.stats.rejected["clock_skew"] == 1)
            await raw.publish(topic, fresh, qos=1)  # the positive signal: live messages still arrive
            await until(lambda: len(got) == 1)
            assert [m.body for m in got] == ["fresh"]
    finally:
        await raw.publish(topic, b"", qos=1, retain=True)
        await raw.aclose()


async def test_state_is_ordered_per_sender_and_key(broker) -> None:
    owner, other, reader = Key.generate(), Key.generate(), Key.generate()
    topic = _topic("state")
    old_v1 = Signer(owner).seal(topic, {"v": 1}, type="state", now=time.time() - 400)[1]
    async with SecureClient(broker.url, owner) as pub, SecureClient(broker.url, other) as rival, \
            SecureClient(broker.url, reader) as client:
        await pub.publish(topic, {"v": 2}, type="state", retain=True)
        got: list[tuple[str, int]] = []
        await client.subscribe(topic, lambda m: got.append((m.sender, m.body["v"])), retained=Retained.STATE,
                               order=lambda m: ("doc", m.body["v"]))
        await until(lambda: len(got) == 1)
        raw = await _raw(broker, owner)
        try:
            await raw.publish(topic, old_v1, qos=1)  # an older version (and over the freshness window)
            await until(lambda: client.stats.stale_state == 1)
        finally:
            await raw.aclose()
        await pub.publish(topic, {"v": 2}, type="state")  # equal: not newer
        await until(lambda: client.stats.stale_state == 2)
        await rival.publish(topic, {"v": 100}, type="state")  # another sender has floors of its own
        await pub.publish(topic, {"v": 3}, type="state")
        await until(lambda: len(got) == 3)
        assert got == [(owner.did, 2), (other.did, 100), (owner.did, 3)]
        await pub.publish(topic, None, type="state")  # no usable version: malformed
        await until(lambda: client.stats.rejected["malformed"] == 1)
    clean = await _raw(broker, owner)
    await clean.publish(topic, b"", qos=1, retain=True)
    await clean.aclose()


async def test_senders_and_encryption_are_enforced_per_subscription(broker) -> None:
    coordinator, device, intruder = Key.generate(), Key.generate(), Key.generate()
    topic = _topic("cmd")
    async with SecureClient(broker.url, device) as dev, SecureClient(broker.url, coordinator) as coord, \
            SecureClient(broker.url, intruder) as bad:
        got: list[Message] = []
        await dev.subscribe(topic, got.append, senders={coordinator.did}, encrypted=True)
        await bad.publish(topic, "forged", encrypt_to=device.did)
        await until(lambda: dev.stats.rejected["wrong_sender"] == 1)
        await coord.publish(topic, "clear")
        await until(lambda: dev.stats.rejected["not_encrypted"] == 1)
        await coord.publish(topic, "sealed", encrypt_to=device.did)
        await until(lambda: len(got) == 1)
        assert [m.body for m in got] == ["sealed"]


async def test_requests_must_carry_an_expiry_and_gates_answer_with_their_reason(broker) -> None:
    node_key, user_key = Key.generate(), Key.generate()
    topic = _topic("gated")
    refused: list[str] = []

    def gate(msg: Message) -> RejectedMessage | None:
        if msg.body == "too much":
            refused.append(msg.sender)
            return RejectedMessage("rate limited", reason="rate_limited")
        return None

    async with SecureClient(broker.url, node_key) as node, SecureClient(broker.url, user_key) as user:
        calls: list[object] = []
        await node.serve(topic, lambda m: (calls.append(m.body), "ok")[1], gate=gate)
        await user.publish(topic, "no exp", type="request", reply_to=user.reply_topic, correlation_id="c1")
        await until(lambda: node.stats.rejected["no_expiry"] == 1)
        with pytest.raises(RemoteError) as info:
            await user.request(topic, "too much", timeout=10)
        assert info.value.reason == "rate_limited" and refused == [user_key.did]
        assert (await user.request(topic, "fine", timeout=10)).body == "ok"
        assert calls == ["fine"]


def test_policy_arguments_are_checked() -> None:
    with pytest.raises(TypeError):
        InboundPolicy(retained=Retained.STATE)  # needs order=
    with pytest.raises(ValueError):
        InboundPolicy(order=lambda m: ("k", 1))  # order only for STATE
    with pytest.raises(TypeError):
        InboundPolicy(senders="did:key:z6Mk")  # a str is not a collection of DIDs
    with pytest.raises(TypeError):
        InboundPolicy(retained="state")  # type: ignore[arg-type]


async def test_first_message_timeout_is_apart_from_the_gap_timeout(broker) -> None:
    from sdk.messaging import RequestTimeout

    node_key, user_key = Key.generate(), Key.generate()
    topic = _topic("slow-start")
    first_sent = asyncio.Event()

    async def slow_start(msg: Message):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.5)
        yield "first"
        first_sent.set()
        await asyncio.sleep(30)
        yield "never"

    async with SecureClient(broker.url, node_key) as node, SecureClient(broker.url, user_key) as user:
        await node.serve(topic, slow_start)
        got: list[object] = []
        with pytest.raises(RequestTimeout) as info:
            async for m in user.stream(topic, None, first_timeout=10, idle_timeout=0.3):
                got.append(m.body)
        assert got == ["first"] and first_sent.is_set()  # the 0.5 s start fit the first-message bound
        assert "idle" in str(info.value)
        with pytest.raises(RequestTimeout) as info:
            async for _ in user.stream(topic, None, first_timeout=0.1, idle_timeout=30):
                pass
        assert "first-message" in str(info.value)


def test_presigned_will_carries_credentials() -> None:
    from sdk.messaging.envelope import Verifier
    from sdk.messaging.will import presigned_will

    key = Key.generate()
    vc = {"type": ["VerifiableCredential"], "credentialSubject": {"id": key.did}}
    will = presigned_will(Signer(key), "autoglm/v1/test/will", {"online": False}, type="ad", credentials=[vc])
    assert will.retain and will.qos == 1
    msg = Verifier().open(will.topic, will.payload, state=True)
    assert msg.credentials == (vc,) and msg.body == {"online": False}


async def test_floors_hold_before_the_retained_copy_arrives(broker) -> None:
    owner, reader = Key.generate(), Key.generate()
    topic = _topic("floor")
    async with SecureClient(broker.url, owner) as pub, SecureClient(broker.url, reader) as client:
        await pub.publish(topic, {"v": 3}, type="state", retain=True)
        got: list[int] = []
        await client.subscribe(topic, lambda m: got.append(m.body["v"]), retained=Retained.STATE,
                               order=lambda m: ("doc", m.body["v"]), floors={(owner.did, "doc"): 5})
        await until(lambda: client.stats.stale_state == 1)  # the retained v3 is below the floor
        await pub.publish(topic, {"v": 6}, type="state")
        await until(lambda: got == [6])
        with pytest.raises(ValueError):
            await client.subscribe(topic, got.append, floors={(owner.did, "doc"): 1})
        await pub.transport.publish(topic, b"", qos=1, retain=True)
