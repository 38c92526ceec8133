"""MqttTransport against real brokers: the embedded amqtt one and a real Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from brokers.embedded import OPEN_ACL, EmbeddedBroker
from sdk.identity import Key
from sdk.messaging.broker_auth import did_credentials
from sdk.messaging.errors import ConnectFailed, NotConnected, SendQueueFull
from sdk.messaging.transport import Message, MqttTransport, TLSConfig, TransportConfig, Will

pytestmark = pytest.mark.broker

KEY = Key.from_seed(bytes(range(32)))


@contextlib.asynccontextmanager
async def _own_mosquitto() -> AsyncIterator[Any]:
    """A Mosquitto of the test's own (the test stops and resumes its process)."""
    from brokers.mosquitto import MosquittoBroker, MosquittoConfig, find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not installed")
    m = MosquittoBroker(MosquittoConfig.open_for_tests())
    await asyncio.to_thread(m.start)
    try:
        yield m
    finally:
        await asyncio.to_thread(m.cleanup)


@contextlib.contextmanager
def _frozen(m: Any) -> Iterator[None]:
    """The broker stopped (SIGSTOP) for the block: connections stay up, nothing is answered."""
    m._proc.send_signal(signal.SIGSTOP)  # noqa: SLF001
    try:
        yield
    finally:
        m._proc.send_signal(signal.SIGCONT)  # noqa: SLF001


def _client(h, **kw) -> MqttTransport:
    return MqttTransport(h.url, **h.credentials(KEY), **kw)


class Inbox:
    """A message handler that collects into a queue."""

    def __init__(self) -> None:
        self.q: asyncio.Queue[Message] = asyncio.Queue()

    def __call__(self, topic: str, payload: bytes, *, retain: bool, qos: int) -> None:
        self.q.put_nowait(Message(topic, payload, qos, retain))

    async def get(self, timeout: float = 5.0) -> Message:
        return await asyncio.wait_for(self.q.get(), timeout)


# --------------------------------------------------------------------------- URL / config


def test_url_parsing() -> None:
    c = TransportConfig.from_url("mqtts://alice:s%40cret@broker.example?protocol=3.1.1&ca=/ca.pem&persistent=1")
    assert (c.host, c.port, c.username, c.password, c.protocol, c.persistent) == (
        "broker.example", 8883, "alice", "s@cret", "3.1.1", True)
    assert c.tls == TLSConfig(ca_file="/ca.pem")
    d = TransportConfig.from_url("mqtt://10.0.0.1:1884?client_id=dev-1&keepalive=5", protocol="5")
    assert (d.port, d.client_id, d.keepalive, d.protocol, d.tls) == (1884, "dev-1", 5, "5", None)
    with pytest.raises(ValueError):
        TransportConfig.from_url("http://x")
    with pytest.raises(ValueError):
        TransportConfig.from_url("mqtt://x?protocol=4.0")


# --------------------------------------------------------------------------- pub/sub


@pytest.mark.parametrize("qos", [0, 1, 2])
async def test_pubsub_each_qos(broker, qos: int) -> None:
    inbox = Inbox()
    async with _client(broker) as sub, _client(broker) as pub:
        assert await sub.subscribe(f"t/{qos}/+", qos=qos, handler=inbox) == qos
        await pub.publish(f"t/{qos}/a", b"payload-%d" % qos, qos=qos)
        msg = await inbox.get()
        assert (msg.topic, msg.payload, msg.retain) == (f"t/{qos}/a", b"payload-%d" % qos, False)
        assert msg.qos >= qos  # amqtt delivers at the subscription QoS, Mosquitto at min(pub, sub)


async def test_async_for_messages_and_callback(broker) -> None:
    seen: list[str] = []
    async with _client(broker) as sub, _client(broker) as pub:
        sub.on_message = None
        await sub.subscribe("iter/#", qos=1)
        for i in range(3):
            await pub.publish(f"iter/{i}", str(i), qos=1)
        async for msg in sub.messages():
            seen.append(msg.payload.decode())
            if len(seen) == 3:
                break
        assert seen == ["0", "1", "2"]
        got = asyncio.get_running_loop().create_future()
        sub.on_message = lambda t, p, *, retain, qos: got.done() or got.set_result((t, p))
        await pub.publish("iter/cb", b"x", qos=1)
        assert await asyncio.wait_for(got, 5) == ("iter/cb", b"x")


async def test_retained_message(broker) -> None:
    topic = f"retained/{broker.kind}"
    async with _client(broker) as pub:
        await pub.publish(topic, b"state", qos=1, retain=True)
    inbox = Inbox()
    async with _client(broker) as late:
        await late.subscribe(topic, qos=1, handler=inbox)
        msg = await inbox.get()
        assert (msg.payload, msg.retain) == (b"state", True)
        await late.publish(topic, b"", qos=1, retain=True)  # clear it


async def test_will_sent_on_unclean_disconnect_only(broker) -> None:
    inbox = Inbox()
    async with _client(broker) as watcher:
        await watcher.subscribe("will/+", qos=1, handler=inbox)
        clean = _client(broker, will=Will("will/clean", b"gone", qos=1))
        await clean.connect()
        await clean.aclose()
        crashed = _client(broker, will=Will("will/crash", b"gone", qos=1))
        await crashed.connect()
        await crashed.abort()  # TCP closed without DISCONNECT
        msg = await inbox.get(timeout=10)
        assert (msg.topic, msg.payload) == ("will/crash", b"gone")
        assert inbox.q.empty()


async def test_unsubscribe_stops_delivery(broker) -> None:
    inbox = Inbox()
    async with _client(broker) as sub, _client(broker) as pub:
        await sub.subscribe("unsub/a", qos=1, handler=inbox)
        await sub.subscribe("unsub/b", qos=1, handler=inbox)
        await sub.unsubscribe("unsub/a")
        await pub.publish("unsub/a", b"1", qos=1)
        await pub.publish("unsub/b", b"2", qos=1)
        assert (await inbox.get()).topic == "unsub/b"
        assert inbox.q.empty()


# --------------------------------------------------------------------------- limits and errors


async def test_send_queue_full_is_a_clear_error(broker) -> None:
    async with _client(broker, max_pending=3) as pub:
        tasks = [asyncio.ensure_future(pub.publish("q/full", b"x", qos=1)) for _ in range(6)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, Exception)]
        assert len(errors) == 3 and all(isinstance(e, SendQueueFull) for e in errors)
        assert errors[0].reason == "queue_full"
        assert pub.pending == 0
        await pub.publish("q/full", b"again", qos=1)  # usable again once acknowledged


async def test_qos0_publish_and_subscribe_need_a_connection(broker) -> None:
    t = _client(broker)
    with pytest.raises(NotConnected):
        await t.publish("x", b"", qos=0)
    await t.connect()
    await t.aclose()
    with pytest.raises(NotConnected):
        await t.subscribe("x")


async def test_connect_refused_is_typed() -> None:
    from brokers.mosquitto import free_port

    with pytest.raises(ConnectFailed) as info:
        await MqttTransport(f"mqtt://127.0.0.1:{free_port()}").connect()
    assert info.value.reason == "connect_failed"


# --------------------------------------------------------------------------- protocol selection


async def test_auto_protocol_falls_back_to_311_on_amqtt() -> None:
    async with EmbeddedBroker(acl=OPEN_ACL) as b:
        url = b.url.split("?")[0]  # no protocol hint: the transport must find out
        async with MqttTransport(url, **did_credentials(KEY)) as t:
            assert t.protocol == "3.1.1"
            inbox = Inbox()
            await t.subscribe("p/x", qos=1, handler=inbox)
            await t.publish("p/x", b"ok", qos=1)
            assert (await inbox.get()).payload == b"ok"


@pytest.mark.mosquitto
async def test_auto_protocol_picks_5_on_mosquitto(mosquitto_broker) -> None:
    async with MqttTransport(mosquitto_broker.url) as t:
        assert t.protocol == "5"
    async with MqttTransport(mosquitto_broker.url + "?protocol=3.1.1") as t:
        assert t.protocol == "3.1.1"


# --------------------------------------------------------------------------- TLS


@pytest.mark.mosquitto
async def test_tls_to_mosquitto(mosquitto_tls) -> None:
    pki = mosquitto_tls.pki
    inbox = Inbox()
    async with MqttTransport(mosquitto_tls.tls_url, tls=TLSConfig(ca_file=str(pki.ca))) as t:
        await t.subscribe("tls/x", qos=1, handler=inbox)
        await t.publish("tls/x", b"secret", qos=1)
        assert (await inbox.get()).payload == b"secret"
    # with a client certificate too, and the URL form
    url = f"{mosquitto_tls.tls_url}?ca={pki.ca}&cert={pki.client.cert}&key={pki.client.key}"
    async with MqttTransport(url) as t:
        assert t.connected
    # an untrusted server certificate is refused
    with pytest.raises(ConnectFailed) as info:
        await MqttTransport(mosquitto_tls.tls_url, tls=TLSConfig()).connect()
    assert isinstance(info.value.__cause__, ssl.SSLError)


# --------------------------------------------------------------------------- reconnect


@pytest.mark.slow
async def test_reconnect_resubscribes_and_reruns_hooks(restartable_broker) -> None:
    h = restartable_broker
    inbox = Inbox()
    connects: list[bool] = []
    async with _client(h, persistent=False) as sub, _client(h) as pub:
        sub.add_on_connect(lambda session_present: connects.append(session_present))
        await sub.subscribe("rc/x", qos=1, handler=inbox)
        await h.restart()
        await sub.wait_connected(15)
        await pub.wait_connected(15)
        for _ in range(100):  # the hook runs after the resubscription completes
            if connects:
                break
            await asyncio.sleep(0.05)
        assert connects == [False] and sub.reconnects == 1
        await pub.publish("rc/x", b"after restart", qos=1, timeout=15)
        assert (await inbox.get(10)).payload == b"after restart"


@pytest.mark.slow
@pytest.mark.mosquitto
async def test_persistent_session_loses_nothing_at_qos1_across_restart(restartable_broker) -> None:
    h = restartable_broker
    if h.kind != "mosquitto":
        pytest.skip("amqtt keeps sessions in memory only: a restart forgets them")
    inbox = Inbox()
    sub = _client(h, client_id="persist-sub", persistent=True)
    await sub.connect()
    await sub.subscribe("persist/#", qos=1, handler=inbox)
    await sub.aclose()  # offline now; its session (and queue) stays on the broker
    async with _client(h, client_id="persist-pub", persistent=True) as pub:
        for i in range(20):  # queued by the broker for the offline subscriber
            await pub.publish(f"persist/{i}", b"%d" % i, qos=1)
        await asyncio.to_thread(h.server.stop)  # SIGTERM: Mosquitto saves sessions and queues
        # published while the broker is down: held by the client, sent after it reconnects
        late = [asyncio.ensure_future(pub.publish(f"persist/{i}", b"%d" % i, qos=1, timeout=30))
                for i in range(20, 30)]
        await asyncio.sleep(0.2)
        assert not pub.connected and not any(t.done() for t in late)
        await asyncio.to_thread(h.server.start)
        await asyncio.gather(*late)
    # the subscriber comes back: the broker still holds its subscription and queued messages
    sub2 = _client(h, client_id="persist-sub", persistent=True, on_message=inbox)
    await sub2.connect()
    try:
        assert sub2.session_present
        got = sorted([int((await inbox.get(15)).payload) for _ in range(30)])
    finally:
        await sub2.aclose()
    assert got == list(range(30))


async def test_full_incoming_queue_pauses_reading_without_loss(broker) -> None:
    async with _client(broker, incoming_limit=4) as sub, _client(broker) as pub:
        await sub.subscribe("bp/#", qos=1)
        await asyncio.gather(*(pub.publish(f"bp/{i}", b"%d" % i, qos=1) for i in range(40)))
        got: list[int] = []
        async for msg in sub.messages():
            got.append(int(msg.payload))
            if len(got) == 40:
                break
        assert sorted(got) == list(range(40))


@pytest.mark.mosquitto
async def test_respects_the_brokers_receive_maximum() -> None:
    from brokers.mosquitto import MosquittoBroker, MosquittoConfig, find_mosquitto

    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not installed")
    m = MosquittoBroker(MosquittoConfig.open_for_tests(max_inflight_messages=3))  # CONNACK Receive Maximum 3
    await asyncio.to_thread(m.start)
    try:
        inbox = Inbox()
        async with MqttTransport(m.url) as sub, MqttTransport(m.url) as pub:
            await sub.subscribe("rm/#", qos=1, handler=inbox)
            assert pub._client._max_inflight_messages == 3  # noqa: SLF001 - paho itself ignores it
            await asyncio.gather(*(pub.publish(f"rm/{i}", b"x", qos=1) for i in range(50)))
            assert pub.reconnects == 0 and pub.connected
            got = {(await inbox.get()).topic for _ in range(50)}
            assert len(got) == 50
    finally:
        await asyncio.to_thread(m.cleanup)


async def test_persistent_session_queues_while_offline(broker) -> None:
    """DID-authenticated sessions are not anonymous, so even amqtt queues for them."""
    inbox = Inbox()
    cid = f"offline-{broker.kind}-{id(inbox)}"
    sub = _client(broker, client_id=cid, persistent=True)
    await sub.connect()
    await sub.subscribe("offline/#", qos=1)
    await sub.aclose()
    async with _client(broker) as pub:
        for i in range(5):
            await pub.publish(f"offline/{i}", b"%d" % i, qos=1)
    back = _client(broker, client_id=cid, persistent=True, on_message=inbox)
    await back.connect()
    try:
        assert back.session_present
        assert sorted([int((await inbox.get()).payload) for _ in range(5)]) == list(range(5))
    finally:
        await back.aclose()


async def test_a_failing_handler_does_not_break_the_connection(broker) -> None:
    inbox = Inbox()

    def broken(topic: str, payload: bytes, *, retain: bool, qos: int) -> None:
        raise RuntimeError("handler bug")

    async def broken_async(topic: str, payload: bytes, *, retain: bool, qos: int) -> None:
        raise RuntimeError("async handler bug")

    async with _client(broker) as sub, _client(broker) as pub:
        await sub.subscribe("hb/sync", qos=1, handler=broken)
        await sub.subscribe("hb/async", qos=1, handler=broken_async)
        await sub.subscribe("hb/ok", qos=1, handler=inbox)
        await pub.publish("hb/sync", b"1", qos=1)
        await pub.publish("hb/async", b"2", qos=1)
        await pub.publish("hb/ok", b"3", qos=1)
        assert (await inbox.get()).payload == b"3"
        assert sub.connected and sub.reconnects == 0


@pytest.mark.slow
@pytest.mark.mosquitto
async def test_keepalive_detects_a_frozen_broker_and_recovers() -> None:
    async with _own_mosquitto() as m, MqttTransport(m.url, keepalive=1) as t:
        with _frozen(m):                   # the TCP link stays up, no PINGRESP
            for _ in range(100):
                if not t.connected:
                    break
                await asyncio.sleep(0.1)
            assert not t.connected  # our PINGREQ went unanswered
        await t.wait_connected(15)
        assert t.reconnects >= 1


async def test_close_while_reconnecting_to_a_dead_broker(restartable_broker) -> None:
    h = restartable_broker
    t = _client(h, backoff_min=0.01, backoff_max=0.05)
    await t.connect()
    if h.kind == "mosquitto":
        await asyncio.to_thread(h.server.stop)
    else:
        await h.server.stop()
    for _ in range(100):
        if not t.connected and t._reconnect_task is not None:  # noqa: SLF001
            break
        await asyncio.sleep(0.02)
    assert not t.connected
    await asyncio.sleep(0.2)  # several refused reconnect attempts
    await asyncio.wait_for(t.aclose(), 5)
    assert not t.connected and t.pending == 0
    with pytest.raises(NotConnected):
        await t.publish("x", b"", qos=1)


async def test_pending_counts_return_to_zero(broker) -> None:
    inbox = Inbox()
    async with _client(broker) as t:
        await t.subscribe("pc/#", qos=1, handler=inbox)
        for qos in (0, 1, 2, 0):
            await t.publish(f"pc/{qos}", b"x", qos=qos)
        await asyncio.gather(*(t.publish("pc/burst", b"y", qos=0) for _ in range(50)))
        for _ in range(54):
            await inbox.get()
        assert t.pending == 0


async def test_tcp_nodelay_is_set(broker) -> None:
    import socket

    async with _client(broker) as t:
        sock = t._sock  # noqa: SLF001
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_a_burst_past_a_full_incoming_queue_arrives_whole(broker) -> None:
    async with _client(broker, incoming_limit=4) as sub, _client(broker) as pub:
        await sub.subscribe("bufp/#", qos=1)
        await asyncio.gather(*(pub.publish(f"bufp/{i}", b"%d" % i, qos=0) for i in range(300)))
        await pub.publish("bufp/end", b"-1", qos=1)
        got: list[int] = []
        async for msg in sub.messages():
            got.append(int(msg.payload))
            if got[-1] == -1:
                break
        assert sorted(got[:-1]) == list(range(300))


@pytest.mark.mosquitto
async def test_an_unacknowledged_publish_times_out_and_still_counts_until_its_ack() -> None:
    from sdk.messaging.errors import PublishTimeout

    async with _own_mosquitto() as m, MqttTransport(m.url, publish_timeout=0.3, keepalive=60) as t:
        await t.publish("to/warm", b"x", qos=1)
        with _frozen(m):                   # the link stays up, no PUBACK comes
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            same = [asyncio.ensure_future(t.publish(f"to/{i}", b"x", qos=1)) for i in range(3)]
            longer = asyncio.ensure_future(t.publish("to/long", b"x", qos=1, timeout=5.0))
            shorter = asyncio.ensure_future(t.publish("to/short", b"x", qos=1, timeout=0.1))  # out of order
            for fut in (*same, shorter):
                with pytest.raises(PublishTimeout, match="within"):
                    await fut
            assert loop.time() - t0 >= 0.1
            assert not longer.done()
            assert t.pending == 5                   # still in the session, awaiting their acks
        await asyncio.wait_for(longer, 10)          # its ack came in time
        for _ in range(200):
            if t.pending == 0:
                break
            await asyncio.sleep(0.02)
        assert t.pending == 0                       # the late acks were taken


async def test_acknowledged_publishes_leave_the_deadline_queue(broker) -> None:
    async with _client(broker) as t:
        for _ in range(3):
            await asyncio.gather(*(t.publish("dq/x", b"x", qos=1) for _ in range(300)))
        assert len(t._ack_deadlines) <= 1          # noqa: SLF001 - not one entry per publish ever made
        assert t.pending == 0
