"""Raw paho vs MqttTransport through a loopback Mosquitto: round trip p50/p99, QoS-1 throughput.

    python3 bench/mqtt_raw_bench.py [--n 2000] [--throughput-n 20000] [--url mqtt://host:port]

Without ``--url`` a Mosquitto (set_tcp_nodelay, big queues) is started on a free loopback port.
The functions can be imported by other benches (e.g. ``bench/messaging_bench.py``).

Round trip: a requester publishes to ``bench/req`` (QoS 0), a responder echoes to ``bench/resp``;
the time from publish to the echo's arrival. Raw paho runs each client with ``loop_start()``
(the usual way) and TCP_NODELAY set; ours runs both transports on one asyncio loop.
Throughput: N QoS-1 messages from one publisher to one QoS-1 subscriber, first publish to last
arrival.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

__all__ = [
    "LatencyStats",
    "percentiles",
    "machine_info",
    "loopback_mosquitto",
    "raw_round_trip",
    "raw_qos1_throughput",
    "transport_round_trip",
    "transport_qos1_throughput",
    "async_round_trip",
]


@dataclass(frozen=True)
class LatencyStats:
    """Round-trip latency summary in milliseconds."""

    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    cpu_us: float = 0.0  # this process's CPU time per round trip (all threads): robust to load


def percentiles(samples_s: list[float], *, cpu_s: float = 0.0) -> LatencyStats:
    """p50/p99/mean in ms of samples given in seconds (``cpu_s``: CPU time spent on them)."""
    s = sorted(samples_s)
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] * 1e3  # noqa: E731
    return LatencyStats(len(s), pick(0.50), pick(0.99), statistics.fmean(s) * 1e3, cpu_s / len(s) * 1e6)


def machine_info() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


@contextlib.contextmanager
def loopback_mosquitto() -> Iterator[str]:
    """A fresh Mosquitto on 127.0.0.1 for the duration; yields its URL."""
    from brokers.mosquitto import MosquittoBroker, MosquittoConfig

    with MosquittoBroker(MosquittoConfig.open_for_tests()) as m:
        yield m.url


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


def _paho(host: str, port: int, name: str) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{name}-{uuid.uuid4().hex[:6]}",
                    protocol=paho.MQTTv5)
    c.on_socket_open = lambda client, userdata, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    connected = threading.Event()
    c.on_connect = lambda client, userdata, flags, rc, props: connected.set()
    c.connect(host, port, 30)
    c.loop_start()
    if not connected.wait(10):
        raise RuntimeError(f"paho client could not connect to {host}:{port}")
    return c


def _subscribe(c: paho.Client, topic: str, qos: int) -> None:
    done = threading.Event()
    c.on_subscribe = lambda client, userdata, mid, codes, props: done.set()
    c.subscribe(topic, qos)
    if not done.wait(10):
        raise RuntimeError("no SUBACK")


def raw_round_trip(url: str, *, n: int = 2000, payload_size: int = 64, warmup: int = 200) -> LatencyStats:
    """Plain paho request/response round trip (two clients, loop_start threads)."""
    host, port = _host_port(url)
    tag = uuid.uuid4().hex[:6]
    req, resp = f"bench/{tag}/req", f"bench/{tag}/resp"
    responder = _paho(host, port, "responder")
    requester = _paho(host, port, "requester")
    try:
        responder.on_message = lambda client, userdata, m: client.publish(resp, m.payload, 0)
        _subscribe(responder, req, 0)
        arrived = threading.Event()
        requester.on_message = lambda client, userdata, m: arrived.set()
        _subscribe(requester, resp, 0)
        payload = os.urandom(payload_size)
        samples: list[float] = []
        cpu0 = 0.0
        for i in range(n + warmup):
            if i == warmup:
                cpu0 = time.process_time()
            arrived.clear()
            t0 = time.perf_counter()
            requester.publish(req, payload, 0)
            if not arrived.wait(5):
                raise RuntimeError("round trip timed out")
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
        return percentiles(samples, cpu_s=time.process_time() - cpu0)
    finally:
        for c in (requester, responder):
            c.disconnect()
            c.loop_stop()


def raw_qos1_throughput(url: str, *, n: int = 20000, payload_size: int = 64) -> float:
    """Plain paho QoS-1 messages per second, one publisher to one subscriber."""
    host, port = _host_port(url)
    topic = f"bench/{uuid.uuid4().hex[:6]}/tp"
    sub = _paho(host, port, "sub")
    pub = _paho(host, port, "pub")
    try:
        count = 0
        done = threading.Event()

        def on_message(client: paho.Client, userdata: object, m: paho.MQTTMessage) -> None:
            nonlocal count
            count += 1
            if count == n:
                done.set()

        sub.on_message = on_message
        _subscribe(sub, topic, 1)
        payload = os.urandom(payload_size)
        t0 = time.perf_counter()
        for _ in range(n):
            pub.publish(topic, payload, 1)
        if not done.wait(120):
            raise RuntimeError(f"only {count}/{n} messages arrived")
        return n / (time.perf_counter() - t0)
    finally:
        for c in (pub, sub):
            c.disconnect()
            c.loop_stop()


async def async_round_trip(
    send: Callable[[bytes], Awaitable[None]],
    arrived: asyncio.Event,
    *,
    n: int,
    payload_size: int = 64,
    warmup: int = 200,
) -> LatencyStats:
    """Time ``send(payload)`` until ``arrived`` is set, n times (any async client)."""
    payload = os.urandom(payload_size)
    samples: list[float] = []
    cpu0 = 0.0
    for i in range(n + warmup):
        if i == warmup:
            cpu0 = time.process_time()
        arrived.clear()
        t0 = time.perf_counter()
        await send(payload)
        await asyncio.wait_for(arrived.wait(), 5)
        if i >= warmup:
            samples.append(time.perf_counter() - t0)
    return percentiles(samples, cpu_s=time.process_time() - cpu0)


async def transport_round_trip(url: str, *, n: int = 2000, payload_size: int = 64) -> LatencyStats:
    """The same round trip through two ``MqttTransport`` instances on this loop."""
    from sdk.messaging.transport import MqttTransport

    tag = uuid.uuid4().hex[:6]
    req, resp = f"bench/{tag}/req", f"bench/{tag}/resp"
    arrived = asyncio.Event()
    async with MqttTransport(url) as responder, MqttTransport(url) as requester:

        def echo(topic: str, payload: bytes, *, retain: bool, qos: int) -> Awaitable[None]:
            return responder.publish(resp, payload, qos=0)

        await responder.subscribe(req, qos=0, handler=echo)
        await requester.subscribe(resp, qos=0, handler=lambda *a, **k: arrived.set())
        return await async_round_trip(lambda p: requester.publish(req, p, qos=0), arrived, n=n,
                                      payload_size=payload_size)


async def transport_qos1_throughput(url: str, *, n: int = 20000, payload_size: int = 64, window: int = 1000) -> float:
    """``MqttTransport`` QoS-1 messages per second (publishes awaited ``window`` at a time)."""
    from sdk.messaging.transport import MqttTransport

    topic = f"bench/{uuid.uuid4().hex[:6]}/tp"
    done = asyncio.Event()
    count = 0

    def on_message(t: str, p: bytes, *, retain: bool, qos: int) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    async with MqttTransport(url) as sub, MqttTransport(url) as pub:
        await sub.subscribe(topic, qos=1, handler=on_message)
        payload = os.urandom(payload_size)
        t0 = time.perf_counter()
        for start in range(0, n, window):
            await asyncio.gather(*(pub.publish(topic, payload, qos=1) for _ in range(min(window, n - start))))
        await asyncio.wait_for(done.wait(), 120)
        return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="broker URL (default: start a loopback mosquitto)")
    ap.add_argument("--n", type=int, default=2000, help="round trips")
    ap.add_argument("--throughput-n", type=int, default=20000, help="QoS-1 messages")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(loopback_mosquitto())
        raw_rt = raw_round_trip(url, n=args.n)
        ours_rt = asyncio.run(transport_round_trip(url, n=args.n))
        raw_tp = raw_qos1_throughput(url, n=args.throughput_n)
        ours_tp = asyncio.run(transport_qos1_throughput(url, n=args.throughput_n))
    result = {
        "machine": machine_info(),
        "raw_paho_round_trip": asdict(raw_rt),
        "transport_round_trip": asdict(ours_rt),
        "raw_paho_qos1_msgs_per_s": round(raw_tp),
        "transport_qos1_msgs_per_s": round(ours_tp),
        "p50_delta_ms": round(ours_rt.p50_ms - raw_rt.p50_ms, 3),
        "throughput_ratio": round(ours_tp / raw_tp, 2),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"machine: {result['machine']}")
    print(f"{'':28}{'p50 ms':>9}{'p99 ms':>9}{'CPU us':>9}")
    for name, st in (("raw paho round trip", raw_rt), ("MqttTransport round trip", ours_rt)):
        print(f"{name:28}{st.p50_ms:9.3f}{st.p99_ms:9.3f}{st.cpu_us:9.1f}")
    print(f"{'raw paho QoS-1 msgs/s':28}{raw_tp:9.0f}")
    print(f"{'MqttTransport QoS-1 msgs/s':28}{ours_tp:9.0f}   ratio {ours_tp / raw_tp:.2f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    raise SystemExit(main())
