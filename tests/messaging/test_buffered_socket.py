"""BufferedSocket: paho's small reads served from one recv, its writes sent in one send per flush,
nothing lost or reordered when the kernel's buffer is full, and the transport over it."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from sdk.messaging import paho_internals as pi
from sdk.messaging.buffered_socket import READ_CHUNK, BufferedSocket
from sdk.messaging.transport import Message, MqttTransport
from tests.messaging.test_transport import _frozen, _own_mosquitto


class CountingSocket(socket.socket):
    """A real socket that counts its recv and send calls."""

    recvs = 0
    sends = 0

    def recv(self, n: int, *args: Any) -> bytes:
        self.recvs += 1
        return super().recv(n, *args)

    def send(self, data: Any, *args: Any) -> int:
        self.sends += 1
        return super().send(data, *args)


@pytest.fixture
def pair() -> Iterator[tuple[CountingSocket, socket.socket]]:
    a, b = socket.socketpair()
    ours = CountingSocket(a.family, a.type, a.proto, fileno=a.detach())
    ours.setblocking(False)
    try:
        yield ours, b
    finally:
        ours.close()
        b.close()


def _drain(sock: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        got += sock.recv(n - len(got))
    return got


def test_small_reads_are_served_from_one_recv(pair: Any) -> None:
    raw, peer = pair
    s = BufferedSocket(raw)
    peer.sendall(b"\x30\x05hello\x40\x02\x00\x01")   # a PUBLISH-like and a PUBACK-like packet
    assert [s.recv(1), s.recv(1), s.recv(5), s.recv(1), s.recv(1), s.recv(2)] == \
        [b"\x30", b"\x05", b"hello", b"\x40", b"\x02", b"\x00\x01"]
    assert raw.recvs == 1 and not s.buffered
    with pytest.raises(BlockingIOError):
        s.recv(1)


def test_reads_keep_order_across_chunks_and_end_of_stream(pair: Any) -> None:
    raw, peer = pair
    s = BufferedSocket(raw)
    data = bytes(range(256)) * (3 * READ_CHUNK // 256 + 7)
    peer.sendall(data)
    peer.shutdown(socket.SHUT_WR)
    got = bytearray()
    while True:
        try:
            part = s.recv(1000)
        except BlockingIOError:
            continue
        if not part:
            break
        got += part
    assert bytes(got) == data
    assert raw.recvs < len(data) // 1000      # chunks, not one recv per read


def test_buffered_is_true_while_read_ahead_bytes_wait(pair: Any) -> None:
    raw, peer = pair
    s = BufferedSocket(raw)
    peer.sendall(b"abc")
    assert s.recv(1) == b"a" and s.buffered
    assert s.recv(10) == b"bc" and not s.buffered
    assert s._in == b""                     # an idle connection keeps no chunk it has handed out


def test_writes_leave_in_one_send_per_flush(pair: Any) -> None:
    raw, peer = pair
    s = BufferedSocket(raw)
    assert s.send(b"\x40\x02\x00\x01") == 4 and s.send(bytearray(b"\x30\x03abc")) == 5
    assert raw.sends == 0 and s.pending == 9
    assert s.flush() is True
    assert raw.sends == 1 and s.pending == 0
    assert _drain(peer, 9) == b"\x40\x02\x00\x01\x30\x03abc"
    assert s.flush() is True and raw.sends == 1      # nothing kept: no system call


def test_a_full_kernel_buffer_keeps_the_rest_in_order(pair: Any) -> None:
    raw, peer = pair
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    s = BufferedSocket(raw)
    blocks = [bytes([i]) * 65536 for i in range(64)]       # 4 MiB: more than the buffers hold
    sent: list[bytes] = []
    for block in blocks:
        s.send(block)
        sent.append(block)
        if not s.flush():
            break
    assert not s.flush() and s.pending > 0                 # the peer reads nothing yet
    with pytest.raises(BlockingIOError):                   # paho keeps further packets itself
        s.send(b"later")
    expected = b"".join(sent)
    got = bytearray()
    while len(got) < len(expected):
        got += peer.recv(1 << 20)
        s.flush()
    assert bytes(got) == expected
    assert s.flush() and s.send(b"later") == 5             # unblocked once everything left


def test_close_hands_over_what_is_kept_and_discard_does_not(pair: Any) -> None:
    raw, peer = pair
    s = BufferedSocket(raw)
    s.send(b"\xe0\x00")                                    # a DISCONNECT written just before close
    s.close()
    assert _drain(peer, 2) == b"\xe0\x00" and peer.recv(10) == b""


def test_discard_then_close_sends_nothing(pair: Any) -> None:
    raw, peer = pair
    s = BufferedSocket(raw)
    s.send(b"not for the wire")
    s.discard()
    s.close()
    assert peer.recv(10) == b""


def test_other_attributes_are_the_sockets(pair: Any) -> None:
    raw, _peer = pair
    s = BufferedSocket(raw)
    assert s.fileno() == raw.fileno() and s.getblocking() is False
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    assert raw.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0
    assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) != 0


# --------------------------------------------------------------------- the transport over it


async def test_a_burst_read_ahead_beyond_one_read_batch_is_all_delivered(mosquitto_broker: Any) -> None:
    """More packets than one read batch arrive in one recv: the rest are read without a new
    epoll event (nothing else arrives after them)."""
    got: asyncio.Queue[Message] = asyncio.Queue()
    n = 2000
    async with MqttTransport(mosquitto_broker.url) as sub, MqttTransport(mosquitto_broker.url) as pub:
        await sub.subscribe("burst/#", qos=1,
                            handler=lambda topic, payload, *, retain, qos: got.put_nowait(
                                Message(topic, payload, qos, retain)))
        await asyncio.gather(*(pub.publish("burst/x", str(i).encode(), qos=1) for i in range(n)))
        seen = [int((await asyncio.wait_for(got.get(), 10)).payload) for _ in range(n)]
    assert seen == list(range(n))


@pytest.mark.mosquitto
async def test_publishes_behind_a_full_socket_buffer_all_arrive_in_order() -> None:
    """The broker stops reading: the transport's flush leaves bytes behind and waits for the
    socket to be writable; once the broker reads again everything arrives, in order."""
    got: asyncio.Queue[Message] = asyncio.Queue()
    block = b"x" * 262144
    async with _own_mosquitto() as m, MqttTransport(m.url) as sub, MqttTransport(m.url, keepalive=60) as pub:
        await sub.subscribe("full/#", qos=1,
                            handler=lambda topic, payload, *, retain, qos: got.put_nowait(
                                Message(topic, payload, qos, retain)))
        sock = pi.socket_of(pub._client)
        assert isinstance(sock, BufferedSocket)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        with _frozen(m):
            sends = [asyncio.ensure_future(pub.publish("full/x", str(i).encode() + block, qos=0))
                     for i in range(48)]
            for _ in range(500):                            # 12 MiB cannot all leave
                if pub._writer_sock is sock:
                    break
                await asyncio.sleep(0.01)
            assert pub._writer_sock is sock and sock.pending > 0
        await asyncio.wait_for(asyncio.gather(*sends), 30)
        seen = [(await asyncio.wait_for(got.get(), 30)).payload for _ in range(48)]
    assert [int(p[:-len(block)]) for p in seen] == list(range(48))
    assert all(p.endswith(block) for p in seen)


class BrokenSend(socket.socket):
    """A duplicate of a connected socket whose sends fail as on a reset connection."""

    def send(self, data: Any, *args: Any) -> int:
        raise BrokenPipeError(32, "Broken pipe")


async def test_a_failed_write_closes_the_connection_and_the_transport_reconnects(mosquitto_broker: Any) -> None:
    """A send error on flush is a lost connection (as paho treats its own send errors): the
    socket is closed, the transport reconnects, and publishing works again."""
    async with MqttTransport(mosquitto_broker.url, backoff_min=0.01) as t:
        await t.publish("broken/warm", b"x", qos=1)
        sock = pi.socket_of(t._client)
        assert isinstance(sock, BufferedSocket)
        real = sock._sock
        sock._sock = BrokenSend(real.family, real.type, real.proto, fileno=os.dup(real.fileno()))
        try:
            sent = asyncio.ensure_future(t.publish("broken/x", b"lost with the connection", qos=1))
            for _ in range(500):
                if t.reconnects >= 1 and t.connected:
                    break
                await asyncio.sleep(0.01)
            assert t.reconnects >= 1 and t.connected
            assert pi.socket_of(t._client) is not sock
            await asyncio.wait_for(t.publish("broken/y", b"after the reconnect", qos=1), 10)
            await asyncio.wait_for(sent, 10)        # the QoS 1 publish is sent again after it
        finally:
            real.close()
