"""Transport overhead benchmark: process CPU per QoS 1 message over loopback Mosquitto.

    python3 bench/transport_bench.py [--n 10000] [--repeats 3] [--baseline-rev dd66ae5] [--json FILE]

One process holds a publishing and a subscribing :class:`~sdk.messaging.transport.MqttTransport`
(MQTT 5, QoS 1 both ways, so paho decodes a PUBLISH and a PUBACK per message). Two patterns:

* ``fanout``: N publishes, one task each, all started in one loop turn (a coordinator's fan-out);
* ``tasks``: 100 tasks, each publishing N/100 messages one after another (awaiting each ack).

Measured from the first publish until the subscriber has all N: ``time.process_time()`` of the
process (CPU seconds, less sensitive than wall time to other load on the machine) per message,
and the publisher's ``loop_write()`` calls. Variants, each in a fresh subprocess, alternated:

* ``paho``: the transport as of ``--baseline-rev`` with paho's own ``Properties``;
* ``tables``: the same transport with :func:`sdk.messaging.paho_internals.share_property_tables`;
* ``new``: the current transport (shared tables and writes coalesced per loop turn).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("paho", "tables", "new")
PATTERNS = ("fanout", "tasks")
TASKS = 100


def _transport_class(variant: str, baseline: str | None) -> Any:
    if variant == "new":
        from sdk.messaging.transport import MqttTransport

        return MqttTransport
    assert baseline is not None
    # the baseline file stands in for the module, so the current one (which shares the tables
    # when imported) is never loaded in this process
    spec = importlib.util.spec_from_file_location("sdk.messaging.transport", baseline)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["sdk.messaging.transport"] = module
    spec.loader.exec_module(module)
    from sdk.messaging import paho_internals

    if variant == "tables":
        assert paho_internals.share_property_tables()
    else:
        assert not paho_internals.properties_shared()
    return module.MqttTransport


async def _measure(cls: Any, url: str, n: int, pattern: str) -> dict[str, float]:
    received = 0
    done = asyncio.Event()
    target = 0

    def on_message(topic: str, payload: bytes, *, retain: bool, qos: int) -> None:
        nonlocal received
        received += 1
        if received == target:
            done.set()

    async def run(count: int) -> None:
        nonlocal target
        target = received + count
        done.clear()
        if pattern == "fanout":
            await asyncio.gather(*(asyncio.create_task(pub.publish("tb/x", payload, qos=1))
                                   for _ in range(count)))
        else:
            async def one_task(k: int) -> None:
                for _ in range(k):
                    await pub.publish("tb/x", payload, qos=1)

            await asyncio.gather(*(one_task(count // TASKS) for _ in range(TASKS)))
        await asyncio.wait_for(done.wait(), 120)

    payload = os.urandom(64)
    async with cls(url, max_pending=n + 1, incoming_limit=n + 1) as sub, \
            cls(url, max_pending=n + 1) as pub:
        await sub.subscribe("tb/#", qos=1, handler=on_message)
        await run(TASKS * 10)  # warm up
        writes = 0
        loop_write = pub._client.loop_write

        def counting() -> Any:
            nonlocal writes
            writes += 1
            return loop_write()

        pub._client.loop_write = counting
        cpu, wall = time.process_time(), time.perf_counter()
        await run(n)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"cpu_us_per_msg": cpu / n * 1e6, "wall_s": wall, "loop_writes": writes}


def _child(args: argparse.Namespace) -> int:
    cls = _transport_class(args.variant, args.baseline)
    print(json.dumps(asyncio.run(_measure(cls, args.url, args.n, args.pattern))))
    return 0


def _run_child(url: str, variant: str, pattern: str, n: int, baseline: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", "--url", url, "--variant", variant,
                          "--pattern", pattern, "--n", str(n), "--baseline", baseline],
                         check=True, capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="messages per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="runs per variant and pattern (median)")
    ap.add_argument("--baseline-rev", default="dd66ae5", help="git revision of the baseline transport")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--pattern", choices=PATTERNS, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _child(args)

    from brokers.mosquitto import MosquittoBroker, MosquittoConfig

    old = subprocess.run(["git", "-C", str(ROOT), "show", f"{args.baseline_rev}:sdk/messaging/transport.py"],
                         check=True, capture_output=True, text=True).stdout
    results: dict[str, dict[str, list[dict[str, float]]]] = {p: {v: [] for v in VARIANTS} for p in PATTERNS}
    with tempfile.TemporaryDirectory() as tmp, MosquittoBroker(MosquittoConfig.open_for_tests()) as broker:
        baseline = os.path.join(tmp, "transport_baseline.py")
        Path(baseline).write_text(old)
        for pattern in PATTERNS:
            for _ in range(args.repeats):
                for variant in VARIANTS:  # alternated, so drifting load hits all alike
                    results[pattern][variant].append(_run_child(broker.url, variant, pattern, args.n, baseline))
    summary: dict[str, Any] = {"n": args.n, "repeats": args.repeats, "baseline_rev": args.baseline_rev,
                               "loadavg": os.getloadavg(), "patterns": {}}
    print(f"N={args.n} QoS 1 messages, median of {args.repeats}; load average {os.getloadavg()[0]:.2f}")
    print(f"{'pattern':8} {'variant':8} {'CPU us/msg':>11} {'vs paho':>8} {'loop_write':>11} {'wall s':>7}")
    for pattern in PATTERNS:
        rows = {}
        for variant in VARIANTS:
            runs = results[pattern][variant]
            rows[variant] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        base = rows["paho"]["cpu_us_per_msg"]
        for variant, row in rows.items():
            print(f"{pattern:8} {variant:8} {row['cpu_us_per_msg']:11.1f} {row['cpu_us_per_msg'] / base - 1:+8.1%}"
                  f" {row['loop_writes']:11.0f} {row['wall_s']:7.2f}")
        summary["patterns"][pattern] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
