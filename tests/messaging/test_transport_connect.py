"""How the transport connects and subscribes: a plain TCP socket opened on the event loop (no
thread per connect), and the subscriptions of one loop turn sent as one SUBSCRIBE."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as paho
import pytest

from sdk.identity import Key
from sdk.messaging import paho_internals as pi
from sdk.messaging.broker_auth import did_credentials
from sdk.messaging.buffered_socket import BufferedSocket
from sdk.messaging.errors import ConnectFailed, SubscribeFailed
from sdk.messaging.transport import Message, MqttTransport
from tests.messaging.test_transport import _frozen, _own_mosquitto

pytestmark = pytest.mark.broker

KEY = Key.from_seed(bytes(range(32)))


def _client(h: Any, **kw: Any) -> MqttTransport:
    return MqttTransport(h.url, **h.credentials(KEY), **kw)


class CountingExecutor(concurrent.futures.ThreadPoolExecutor):
    """The loop's default executor, counting what is handed to it."""

    submitted = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


class SubscribeCounter:
    """Counts the SUBSCRIBE packets the real paho client sends (and the filters in each)."""

    def __init__(self, t: MqttTransport) -> None:
        client = t._client
        assert client is not None
        self.packets: list[list[str]] = []
        subscribe = client.subscribe

        def counting(topic: Any, *args: Any, **kwargs: Any) -> Any:
            self.packets.append([f for f, _ in topic] if isinstance(topic, list) else [topic])
            return subscribe(topic, *args, **kwargs)

        client.subscribe = counting  # type: ignore[method-assign]


def _inbox(q: asyncio.Queue[Message]) -> Any:
    return lambda topic, payload, *, retain, qos: q.put_nowait(Message(topic, payload, qos, retain))


# --------------------------------------------------------------------- connecting on the loop


async def test_a_plain_connection_is_opened_on_the_loop_not_in_a_thread(broker: Any) -> None:
    loop = asyncio.get_running_loop()
    executor = CountingExecutor(max_workers=1)
    loop.set_default_executor(executor)
    got: asyncio.Queue[Message] = asyncio.Queue()
    async with _client(broker) as sub, _client(broker) as pub:
        await sub.subscribe("direct/#", qos=1, handler=_inbox(got))
        await pub.publish("direct/x", b"over a socket opened on the loop", qos=1)
        assert (await asyncio.wait_for(got.get(), 5)).payload == b"over a socket opened on the loop"
        sock = pi.socket_of(pub._client)
        assert isinstance(sock, BufferedSocket) and not sock.getblocking()
    assert executor.submitted == 0


async def test_a_host_name_is_resolved_then_connected(mosquitto_broker: Any) -> None:
    async with MqttTransport(f"mqtt://localhost:{mosquitto_broker.port}") as t:
        assert t.connected
        await t.publish("named/x", b"hello", qos=1)


async def test_a_reconnect_opens_a_fresh_socket_of_its_own(restartable_broker: Any) -> None:
    got: asyncio.Queue[Message] = asyncio.Queue()
    async with _client(restartable_broker) as sub, _client(restartable_broker) as pub:
        await sub.subscribe("again/#", qos=1, handler=_inbox(got))
        first = pi.socket_of(sub._client)
        await restartable_broker.restart()
        await sub.wait_connected(20)
        await pub.wait_connected(20)
        assert pi.socket_of(sub._client) is not first and first.fileno() == -1
        await pub.publish("again/x", b"after the restart", qos=1)
        assert (await asyncio.wait_for(got.get(), 10)).payload == b"after the restart"


@contextlib.contextmanager
def _unanswered_port() -> Iterator[int]:
    """A port whose connects hang: its listener's accept queue is full, so SYNs go unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        fillers.append(s)
    try:
        yield port
    finally:
        for s in [*fillers, listener]:
            s.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_connect_left_unanswered_times_out_typed_and_keeps_no_socket() -> None:
    with _unanswered_port() as port:
        before = _open_fds()
        with pytest.raises(ConnectFailed, match="cannot reach broker"):
            await MqttTransport(f"mqtt://127.0.0.1:{port}", connect_timeout=0.3).connect()
        assert _open_fds() == before


async def test_a_cancelled_connect_keeps_no_socket() -> None:
    with _unanswered_port() as port:
        before = _open_fds()
        task = asyncio.create_task(MqttTransport(f"mqtt://127.0.0.1:{port}", connect_timeout=30).connect())
        for _ in range(200):                # until its socket exists (the connect is under way)
            if _open_fds() > before:
                break
            await asyncio.sleep(0.01)
        assert _open_fds() > before
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert _open_fds() == before


def test_only_a_plain_tcp_client_takes_a_socket_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    assert pi.opens_plain_socket(plain)
    tls = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    tls.tls_set_context(ssl.create_default_context())
    assert not pi.opens_plain_socket(tls)            # the TLS handshake stays in paho's hands
    ws = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5, transport="websockets")
    assert not pi.opens_plain_socket(ws)
    proxied = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    monkeypatch.setattr(proxied, "_get_proxy", lambda: {"proxy_type": 2, "proxy_addr": "proxy"})
    assert not pi.opens_plain_socket(proxied)        # a proxy (explicit or from the environment)


def test_an_unknown_paho_keeps_the_blocking_connect(caplog: pytest.LogCaptureFixture) -> None:
    class OtherClient:
        def reconnect(self) -> None:
            self._sock = socket.create_connection(("127.0.0.1", 1))

    with caplog.at_level("WARNING", logger=pi.__name__):
        assert not pi.opens_plain_socket(OtherClient())
    assert "reconnect() through _create_socket" in caplog.text


def test_the_socket_handed_over_is_used_once() -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    a, b = socket.socketpair()
    try:
        taken: list[Any] = []
        pi.connect_over(client, a, lambda: taken.append(client._create_socket()))
        assert taken == [a]
        assert "_create_socket" not in client.__dict__   # the next connect opens its own
        with pytest.raises(RuntimeError):
            pi.connect_over(client, a, lambda: (_ for _ in ()).throw(RuntimeError("refused")))
        assert "_create_socket" not in client.__dict__   # also after a failed connect
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------------- one SUBSCRIBE per turn


async def test_subscriptions_of_one_turn_leave_as_one_subscribe(broker: Any) -> None:
    queues: dict[str, asyncio.Queue[Message]] = {f"batch/{q}": asyncio.Queue() for q in (0, 1, 2)}
    async with _client(broker) as sub, _client(broker) as pub:
        packets = SubscribeCounter(sub)
        granted = await asyncio.gather(*(sub.subscribe(f, qos=q, handler=_inbox(queues[f]))
                                         for q, f in enumerate(queues)))
        assert granted == [0, 1, 2]                      # each caller gets its own reason code
        assert packets.packets == [list(queues)]
        for f in queues:
            await pub.publish(f, f.encode(), qos=1)
        for f, q in queues.items():                      # and each handler its own messages
            assert (await asyncio.wait_for(q.get(), 5)).payload == f.encode()
        await sub.subscribe("batch/later", qos=1)        # a later turn: a packet of its own
        assert packets.packets[1:] == [["batch/later"]]


async def test_a_publish_after_a_subscribe_in_the_same_turn_leaves_after_it(broker: Any) -> None:
    got: asyncio.Queue[Message] = asyncio.Queue()
    async with _client(broker) as t:
        # not awaited in between: the SUBSCRIBE must reach the broker before this PUBLISH does,
        # or the broker has no subscription to deliver it to
        await asyncio.gather(t.subscribe("order/x", qos=1, handler=_inbox(got)),
                             t.publish("order/x", b"mine", qos=1))
        assert (await asyncio.wait_for(got.get(), 5)).payload == b"mine"


async def test_the_same_filter_twice_in_a_turn_goes_in_two_packets(broker: Any) -> None:
    async with _client(broker) as t:
        packets = SubscribeCounter(t)
        assert await asyncio.gather(t.subscribe("twice/x", qos=0), t.subscribe("twice/x", qos=1),
                                    t.subscribe("twice/y", qos=1)) == [0, 1, 1]
        assert packets.packets == [["twice/x"], ["twice/x", "twice/y"]]


async def test_a_refused_filter_fails_alone_in_its_batch(embedded_broker_strict: Any) -> None:
    own = f"autoglm/v1/reply/{KEY.did.rsplit(':', 1)[-1]}"
    other = f"autoglm/v1/reply/{Key.from_seed(bytes(32)).did.rsplit(':', 1)[-1]}"
    got: asyncio.Queue[Message] = asyncio.Queue()
    async with MqttTransport(embedded_broker_strict.url, **did_credentials(KEY)) as t:
        packets = SubscribeCounter(t)
        ok, refused = await asyncio.gather(t.subscribe(own, qos=1, handler=_inbox(got)),
                                           t.subscribe(other, qos=1), return_exceptions=True)
        assert packets.packets == [[own, other]]
        assert ok == 1
        assert isinstance(refused, SubscribeFailed) and other in str(refused)
        await t.publish(own, b"still delivered", qos=1)
        assert (await asyncio.wait_for(got.get(), 5)).payload == b"still delivered"


async def test_a_batch_without_a_suback_times_out_and_is_forgotten() -> None:
    async with _own_mosquitto() as m, MqttTransport(m.url, connect_timeout=5) as t:
        with _frozen(m):
            results = await asyncio.gather(t.subscribe("slow/a", qos=1, timeout=0.3),
                                           t.subscribe("slow/b", qos=1, timeout=0.3),
                                           return_exceptions=True)
            assert all(isinstance(r, SubscribeFailed) and r.reason == "timeout" for r in results)
            assert t._sub_futs == {}                    # nobody waits for that SUBACK any more
        assert await t.subscribe("slow/c", qos=1) == 1  # the connection is still usable
