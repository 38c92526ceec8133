"""Messaging benchmark on loopback Mosquitto: raw paho vs the signed / encrypted SecureClient.

    python3 bench/messaging_bench.py [--n 2000] [--throughput-n 20000] [--url URL] [--json]

Same set-up as ``bench/mqtt_raw_bench.py`` (whose raw paho and transport helpers it reuses):
round trip = a requester publishes, a responder answers, both clients in this process, QoS 0;
raw paho runs its clients on ``loop_start()`` threads with TCP_NODELAY. Ours: two SecureClients
on one asyncio loop doing ``request()`` → ``serve()`` (every message signed and verified, replay
and topic checks; the encrypted variant also encrypts request and response end to end).
Throughput: N QoS-1 messages, one publisher → one subscriber (ours verifies every message),
first publish to last arrival. Prints the deltas/ratios against the issue's targets: signed p50
within 0.3 ms of raw, signed throughput ≥ 60 % of raw. ``CPU us`` (this process's CPU time per
round trip) is less sensitive to other load on the machine than wall-clock latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.mqtt_raw_bench import (  # noqa: E402
    LatencyStats,
    loopback_mosquitto,
    machine_info,
    percentiles,
    raw_qos1_throughput,
    raw_round_trip,
    transport_qos1_throughput,
    transport_round_trip,
)

TARGET_P50_DELTA_MS = 0.3
TARGET_THROUGHPUT_RATIO = 0.6
BODY = {"data": "x" * 64}


def _keys():  # noqa: ANN202
    from sdk.identity import Key

    return Key.from_seed(b"\x01" * 32), Key.from_seed(b"\x02" * 32)


async def secure_round_trip(url: str, *, n: int, encrypt: bool, warmup: int = 200) -> LatencyStats:
    """SecureClient request/response (signed; optionally end-to-end encrypted), QoS 0."""
    from sdk.mesh import topics as mesh_topics
    from sdk.messaging import ClientConfig, SecureClient

    node_key, user_key = _keys()
    cfg = ClientConfig(qos=0)
    topic = mesh_topics.inference_requests("bench")
    async with SecureClient(url, node_key, config=cfg) as node, SecureClient(url, user_key, config=cfg) as user:
        await node.serve(topic, lambda m: m.body)
        to = node_key.did if encrypt else None
        samples: list[float] = []
        cpu0 = 0.0
        for i in range(n + warmup):
            if i == warmup:
                cpu0 = time.process_time()
            t0 = time.perf_counter()
            await user.request(topic, BODY, timeout=5, encrypt_to=to)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
        stats = percentiles(samples, cpu_s=time.process_time() - cpu0)
        assert not node.stats.rejected and not user.stats.rejected
        return stats


async def secure_qos1_throughput(url: str, *, n: int, window: int = 1000) -> float:
    """Signed QoS-1 messages per second, one publisher → one verifying subscriber."""
    from sdk.coord import protocol
    from sdk.messaging import SecureClient

    pub_key, sub_key = _keys()
    topic = protocol.device_events("bench")
    done = asyncio.Event()
    count = 0

    def on_message(msg: object) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    async with SecureClient(url, sub_key) as sub, SecureClient(url, pub_key) as pub:
        await sub.subscribe(topic, on_message, qos=1)
        t0 = time.perf_counter()
        for start in range(0, n, window):
            await asyncio.gather(*(pub.publish(topic, BODY, qos=1) for _ in range(min(window, n - start))))
        await asyncio.wait_for(done.wait(), 300)
        rate = n / (time.perf_counter() - t0)
        assert not sub.stats.rejected, sub.stats.rejected
        return rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="broker URL (default: start a loopback mosquitto)")
    ap.add_argument("--n", type=int, default=2000, help="round trips per variant")
    ap.add_argument("--throughput-n", type=int, default=20000, help="QoS-1 messages per throughput run")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(loopback_mosquitto())
        load0 = os.getloadavg()[0]
        rt = {
            "raw paho": raw_round_trip(url, n=args.n),
            "transport (no envelope)": asyncio.run(transport_round_trip(url, n=args.n)),
            "signed": asyncio.run(secure_round_trip(url, n=args.n, encrypt=False)),
            "signed+encrypted": asyncio.run(secure_round_trip(url, n=args.n, encrypt=True)),
        }
        tp = {
            "raw paho": raw_qos1_throughput(url, n=args.throughput_n),
            "transport (no envelope)": asyncio.run(transport_qos1_throughput(url, n=args.throughput_n)),
            "signed": asyncio.run(secure_qos1_throughput(url, n=args.throughput_n)),
        }
        load1 = os.getloadavg()[0]
    delta = rt["signed"].p50_ms - rt["raw paho"].p50_ms
    ratio = tp["signed"] / tp["raw paho"]
    result = {
        "machine": machine_info(),
        "load_avg_1m": [round(load0, 2), round(load1, 2)],
        "round_trip": {k: asdict(v) for k, v in rt.items()},
        "qos1_msgs_per_s": {k: round(v) for k, v in tp.items()},
        "signed_p50_delta_ms": round(delta, 3),
        "signed_throughput_ratio": round(ratio, 2),
        "targets_met": {"p50_delta": delta <= TARGET_P50_DELTA_MS, "throughput": ratio >= TARGET_THROUGHPUT_RATIO},
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"machine: {result['machine']}; 1-min load average {load0:.2f} → {load1:.2f}")
    print(f"{'round trip (QoS 0)':28}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'CPU us':>9}")
    for name, st in rt.items():
        print(f"{name:28}{st.p50_ms:9.3f}{st.p99_ms:9.3f}{st.mean_ms:9.3f}{st.cpu_us:9.1f}")
    print(f"{'QoS-1 throughput':28}{'msg/s':>9}")
    for name, v in tp.items():
        print(f"{name:28}{v:9.0f}")
    ok = result["targets_met"]
    print(f"signed p50 - raw p50 = {delta:+.3f} ms (target <= +{TARGET_P50_DELTA_MS:.3f}): "
          f"{'OK' if ok['p50_delta'] else 'MISSED'}")
    print(f"signed / raw throughput = {ratio:.2f} (target >= {TARGET_THROUGHPUT_RATIO:.2f}): "
          f"{'OK' if ok['throughput'] else 'MISSED'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
