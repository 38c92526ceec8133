"""Messaging benchmark on loopback Mosquitto: raw paho vs the signed / encrypted SecureClient.

    python3 bench/messaging_bench.py [--rtt N] [--msgs N] [--json out.json]

Request/response round trip p50/p99 (responder in another process, QoS 1 both ways, MQTT 3.1.1):
raw paho (threaded loop, TCP_NODELAY), the asyncio transport without envelopes, SecureClient
signed, and signed + end-to-end encrypted. QoS 1 throughput publisher → subscriber (subscriber in
another process, verifying every message): raw paho vs signed. Prints the ratios against the
targets: signed p50 within 0.3 ms of raw, signed throughput ≥ 60 % of raw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

REQ, REP, THR = "autoglm/v1/bench/req", "autoglm/v1/reply/bench", "autoglm/v1/bench/thr"
SEC_REQ = "autoglm/v1/inf/req/bench"
BODY = {"i": 0, "data": "x" * 64}
PAYLOAD = json.dumps(BODY).encode()
PROTO = "3.1.1"  # every client speaks MQTT 3.1.1, like the raw paho baseline (paho's v5 path costs more)


# ---------------------------------------------------------------- raw paho helpers

def _paho(host: str, port: int, *, inflight: int = 100) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    c.max_inflight_messages_set(inflight)
    c.connect(host, port, 30)
    c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def _host_port(url: str) -> tuple[str, int]:
    hp = url.split("://", 1)[1]
    host, port = hp.rsplit(":", 1)
    return host, int(port)


def raw_responder(url: str, ready: mp.Event, stop: mp.Event) -> None:
    """Echo every request on REQ to REP (QoS 1)."""
    host, port = _host_port(url)
    c = _paho(host, port)
    c.on_message = lambda cl, ud, m: cl.publish(REP, m.payload, qos=1)
    c.on_connect = lambda cl, ud, fl, rc, pr: cl.subscribe(REQ, qos=1)
    c.subscribe(REQ, qos=1)
    c.loop_start()
    time.sleep(0.3)
    ready.set()
    stop.wait()
    c.loop_stop()
    c.disconnect()


def raw_subscriber(url: str, n: int, ready: mp.Event, out: mp.Queue) -> None:
    """Count n messages on THR; report the wall time of the last one."""
    host, port = _host_port(url)
    c = _paho(host, port)
    done = threading.Event()
    count = [0]

    def on_message(cl, ud, m):  # noqa: ANN001
        count[0] += 1
        if count[0] == n:
            out.put(time.time())
            done.set()

    c.on_message = on_message
    c.subscribe(THR, qos=1)
    c.loop_start()
    time.sleep(0.3)
    ready.set()
    done.wait(300)
    c.loop_stop()
    c.disconnect()


def raw_rtt(url: str, n: int, warmup: int) -> list[float]:
    host, port = _host_port(url)
    c = _paho(host, port)
    got = threading.Event()
    c.on_message = lambda cl, ud, m: got.set()
    c.subscribe(REP, qos=1)
    c.loop_start()
    time.sleep(0.3)
    out = []
    for i in range(n + warmup):
        got.clear()
        t0 = time.perf_counter()
        c.publish(REQ, PAYLOAD, qos=1)
        if not got.wait(5):
            raise RuntimeError("raw paho: no reply")
        if i >= warmup:
            out.append(time.perf_counter() - t0)
    c.loop_stop()
    c.disconnect()
    return out


def raw_throughput(url: str, n: int) -> float:
    ctx = mp.get_context("spawn")
    ready, q = ctx.Event(), ctx.Queue()
    p = ctx.Process(target=raw_subscriber, args=(url, n, ready, q))
    p.start()
    if not ready.wait(120):
        raise RuntimeError("raw subscriber did not start")
    host, port = _host_port(url)
    c = _paho(host, port)
    c.loop_start()
    t0 = time.time()
    for _ in range(n):
        c.publish(THR, PAYLOAD, qos=1)
    t_last = q.get(timeout=300)
    c.loop_stop()
    c.disconnect()
    p.join(10)
    return n / (t_last - t0)


# ---------------------------------------------------------------- SecureClient helpers

def _key(seed: int):  # noqa: ANN202
    from sdk.identity import Key

    return Key.from_seed(bytes([seed]) * 32)


def secure_responder(url: str, ready: mp.Event, stop: mp.Event) -> None:
    from sdk.coord import SecureClient

    async def main() -> None:
        async with SecureClient(url, _key(1), protocol=PROTO) as node:
            await node.serve(SEC_REQ, lambda m: m.body)
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    asyncio.run(main())


def secure_subscriber(url: str, n: int, ready: mp.Event, out: mp.Queue) -> None:
    from sdk.coord import SecureClient

    async def main() -> None:
        done = asyncio.Event()
        count = [0]

        def handler(m) -> None:  # noqa: ANN001
            count[0] += 1
            if count[0] == n:
                out.put(time.time())
                done.set()

        async with SecureClient(url, _key(3), protocol=PROTO) as sub:
            await sub.subscribe(THR, handler)
            ready.set()
            try:
                await asyncio.wait_for(done.wait(), 120)
            except asyncio.TimeoutError:
                out.put(None)
            out.put({"received": count[0], "rejected": dict(sub.stats.rejected)})

    asyncio.run(main())


async def transport_rtt(url: str, n: int, warmup: int) -> list[float]:
    """B1's asyncio transport, no envelope (against the raw responder)."""
    from sdk.coord import MqttTransport

    loop = asyncio.get_running_loop()
    box: list[asyncio.Future] = []

    def on_reply(topic, payload, *, retain, qos) -> None:  # noqa: ANN001
        if box and not box[0].done():
            box[0].set_result(payload)

    out = []
    async with MqttTransport(url, protocol=PROTO) as t:
        await t.subscribe(REP, qos=1, handler=on_reply)
        for i in range(n + warmup):
            box[:] = [loop.create_future()]
            t0 = time.perf_counter()
            await t.publish(REQ, PAYLOAD, qos=1)
            await asyncio.wait_for(box[0], 5)
            if i >= warmup:
                out.append(time.perf_counter() - t0)
    return out


async def secure_rtt(url: str, n: int, warmup: int, *, encrypt: bool) -> list[float]:
    from sdk.coord import SecureClient

    node_did = _key(1).did
    out = []
    async with SecureClient(url, _key(2), protocol=PROTO) as user:
        for i in range(n + warmup):
            t0 = time.perf_counter()
            await user.request(SEC_REQ, BODY, timeout=5, encrypt_to=node_did if encrypt else None)
            if i >= warmup:
                out.append(time.perf_counter() - t0)
    return out


async def secure_publish(url: str, n: int, window: int = 500) -> float:
    from sdk.coord import SecureClient

    async with SecureClient(url, _key(4), protocol=PROTO) as pub:
        t0 = time.time()
        for start in range(0, n, window):
            await asyncio.gather(*(pub.publish(THR, BODY) for _ in range(min(window, n - start))))
        return t0


def secure_throughput(url: str, n: int) -> tuple[float, dict]:
    ctx = mp.get_context("spawn")
    ready, q = ctx.Event(), ctx.Queue()
    p = ctx.Process(target=secure_subscriber, args=(url, n, ready, q))
    p.start()
    if not ready.wait(120):
        raise RuntimeError("signed subscriber did not start")
    t0 = asyncio.run(secure_publish(url, n))
    t_last = q.get(timeout=180)
    info = q.get(timeout=30)
    p.join(10)
    if t_last is None:
        raise RuntimeError(f"signed subscriber got only {info}")
    return n / (t_last - t0), info["rejected"]


def with_responder(target, url: str, fn):  # noqa: ANN001, ANN201
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    p = ctx.Process(target=target, args=(url, ready, stop))
    p.start()
    try:
        if not ready.wait(120):
            raise RuntimeError("responder did not start")
        return fn()
    finally:
        stop.set()
        p.join(10)
        if p.is_alive():
            p.terminate()


# ---------------------------------------------------------------- main

def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rtt", type=int, default=2000, help="round trips per variant")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--msgs", type=int, default=20000, help="messages per throughput run")
    ap.add_argument("--url", default=None, help="existing broker (default: start a loopback mosquitto)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    broker = None
    url = args.url
    if url is None:
        from brokers.mosquitto import MosquittoBroker

        broker = MosquittoBroker()
        broker.start()
        url = broker.url
    try:
        rtt = {
            "raw paho": with_responder(raw_responder, url, lambda: raw_rtt(url, args.rtt, args.warmup)),
            "transport (no envelope)": with_responder(
                raw_responder, url, lambda: asyncio.run(transport_rtt(url, args.rtt, args.warmup))),
        }
        rtt.update(with_responder(secure_responder, url, lambda: {
            "signed": asyncio.run(secure_rtt(url, args.rtt, args.warmup, encrypt=False)),
            "signed+encrypted": asyncio.run(secure_rtt(url, args.rtt, args.warmup, encrypt=True)),
        }))
        thr_raw = raw_throughput(url, args.msgs)
        thr_signed, rejected = secure_throughput(url, args.msgs)
    finally:
        if broker is not None:
            broker.cleanup()

    print(f"machine: {platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
          f"python={platform.python_version()} load={os.getloadavg()[0]:.2f}")
    print(f"{'round trip (QoS 1)':28s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean ms':>8s}")
    res: dict = {"rtt": {}, "throughput": {}}
    for name, xs in rtt.items():
        p50, p99 = _pct(xs, 0.5), _pct(xs, 0.99)
        res["rtt"][name] = {"p50_ms": p50, "p99_ms": p99, "mean_ms": statistics.mean(xs) * 1000}
        print(f"{name:28s} {p50:8.3f} {p99:8.3f} {statistics.mean(xs) * 1000:8.3f}")
    print(f"QoS 1 throughput: raw {thr_raw:,.0f} msg/s, signed {thr_signed:,.0f} msg/s "
          f"(subscriber rejections: {rejected or 'none'})")
    res["throughput"] = {"raw_msg_s": thr_raw, "signed_msg_s": thr_signed}
    d50 = res["rtt"]["signed"]["p50_ms"] - res["rtt"]["raw paho"]["p50_ms"]
    ratio = thr_signed / thr_raw
    ok1, ok2 = d50 <= 0.3, ratio >= 0.6
    print(f"signed p50 - raw p50 = {d50:+.3f} ms (target <= +0.300 ms): {'OK' if ok1 else 'MISSED'}")
    print(f"signed / raw throughput = {ratio:.2f} (target >= 0.60): {'OK' if ok2 else 'MISSED'}")
    res["targets"] = {"signed_p50_delta_ms": d50, "throughput_ratio": ratio, "met": ok1 and ok2}
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
