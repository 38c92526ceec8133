"""Coordination on a two-node ejabberd cluster versus one Mosquitto, in one run (one machine).

    python3 bench/cluster_bench.py [--events 200] [--devices 1000] [--failover 200] [--json out.json]

Per broker tier (``mosquitto``: one loopback Mosquitto; ``ejabberd``: two ejabberd nodes joined in
a cluster, DID extauth and the %u topic ACL, the coordinator on node 1 and the devices on node 2):

1. event -> config applied on the target device (display event, rules, SQLite commit, signed push,
   device verification, app callback): p50/p99;
2. fan-out: one event retargets N devices (each its own connection and key); time until all applied;
3. (cluster only) broker node failover: ``--failover`` devices and the coordinator on node 1, all
   with both URLs; kill -9 node 1; time until every one of them is admitted again through node 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brokers.ejabberd import EjabberdCluster
from brokers.mosquitto import MosquittoBroker, MosquittoConfig
from sdk.coord.coordinator import Coordinator, parse_rules
from sdk.coord.device import Device
from sdk.coord.events import screen_available
from sdk.identity import Key, TrustPolicy

RULES = [{
    "name": "companion", "event": "screen_available", "when": {"sender.kind": "display"},
    "target": {"select": "group", "group_prefix": "room:", "where": {"device.kind": "phone"}},
    "config": {"ui.layout": "companion", "ui.companion.resolution": "{event.width}x{event.height}"},
}]
ADMIN = Key.from_seed(b"autoglm-bench-cluster-coordinatr")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Tier:
    """Where the coordinator and the devices connect, and their login options."""

    def __init__(self, name: str, coordinator_url: str, device_url: str, cluster: EjabberdCluster | None) -> None:
        self.name, self.coordinator_url, self.device_url, self.cluster = name, coordinator_url, device_url, cluster

    def login(self, key: Key) -> dict[str, Any]:
        return self.cluster.credentials(key) if self.cluster is not None else {}


async def run_tier(tier: Tier, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    tmp = tempfile.TemporaryDirectory(prefix="cluster-bench-")
    coord = Coordinator(ADMIN, broker=tier.coordinator_url, data_dir=Path(tmp.name), trust=TrustPolicy({}),
                        issuer=Key.generate(), rules=parse_rules(RULES), heartbeat_ttl=600, **tier.login(ADMIN))
    await coord.start()
    devices: list[Device] = []
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(32)

    async def make(kind: str, room: str, on_config: Any = None, *, url: str | None = None,
                   auth_timeout: float = 60.0) -> Device:
        key = Key.generate()
        cred = coord.issue_device_credential(key.did, kind=kind, groups=[room])
        dev = Device(key, cred, broker=url or tier.device_url, coordinator=ADMIN.did, on_config=on_config,
                     heartbeat_ttl=600, auth_timeout=auth_timeout, **tier.login(key))
        async with sem:
            await dev.connect()
        devices.append(dev)
        return dev

    try:
        # 1. event -> config applied
        waiter: dict[str, Any] = {}

        def on_config(cfg: Any) -> None:
            fut = waiter.get("f")
            if fut is not None and not fut.done():
                fut.set_result(cfg.version)

        display = await make("display", "room:e2e")
        await make("phone", "room:e2e", on_config)
        lat = []
        for i in range(args.events + 20):
            waiter["f"] = loop.create_future()
            t0 = time.perf_counter()
            await display.publish_event(screen_available(800 + i, 600))
            await asyncio.wait_for(waiter["f"], 30)
            if i >= 20:
                lat.append((time.perf_counter() - t0) * 1000)
        out["event_to_applied_ms"] = {"n": len(lat), "p50": round(pct(lat, .5), 3),
                                      "p99": round(pct(lat, .99), 3), "mean": round(statistics.fmean(lat), 3)}
        print(f"[{tier.name}] event -> config applied: p50 {out['event_to_applied_ms']['p50']:.2f} ms  "
              f"p99 {out['event_to_applied_ms']['p99']:.2f} ms (n={len(lat)})", flush=True)

        # 2. fan-out
        n = args.devices
        done: list[float] = []
        all_done = loop.create_future()

        def fan_cb(cfg: Any) -> None:
            done.append(time.perf_counter())
            if len(done) == n and not all_done.done():
                all_done.set_result(None)

        t0 = time.perf_counter()
        await asyncio.gather(*(make("phone", "room:fan", fan_cb) for _ in range(n)))
        setup = time.perf_counter() - t0
        src = await make("display", "room:fan")
        t0 = time.perf_counter()
        await src.publish_event(screen_available(1920, 1080))
        await asyncio.wait_for(all_done, 600)
        t_all = time.perf_counter() - t0
        out["fanout"] = {"devices": n, "all_applied_ms": round(t_all * 1000, 1), "connect_and_auth_s": round(setup, 2)}
        print(f"[{tier.name}] fan-out to {n} devices: all applied in {t_all * 1000:.1f} ms "
              f"(setup: {n} connects + handshakes in {setup:.1f} s)", flush=True)
        for d in devices:
            await d.aclose()
        devices.clear()

        # 3. broker node failover (cluster only): the coordinator on the killed node too, then not
        if tier.cluster is not None and args.failover:
            out["broker_failover"] = [await failover(tier.cluster, coord, make, devices, args.failover)]
            for d in devices:
                await d.aclose()
            devices.clear()
            await asyncio.to_thread(tier.cluster.restart, 0)  # the coordinator stays on node 2
            out["broker_failover"].append(await failover(tier.cluster, coord, make, devices, args.failover))
    finally:
        for d in devices:
            await d.aclose()
        await coord.stop()
        tmp.cleanup()
    return out


async def failover(cluster: EjabberdCluster, coord: Coordinator, make: Any, devices: list[Device],
                   m: int) -> dict[str, Any]:
    """``m`` devices with both URLs (they land on node 1); kill -9 node 1; time until each of them
    is admitted again (through node 2)."""
    loop = asyncio.get_running_loop()
    # the default auth_timeout (5 s): a hello sent while the coordinator itself is failing over is
    # lost (a clean session on the new node) and sent again after it
    await asyncio.gather(*(make("phone", "room:fo", url=cluster.url, auth_timeout=5.0) for _ in range(m)))
    on_node1 = {d.did for d in devices if d.client.transport.broker_url == cluster.urls[0]}
    coordinator_moves = coord.client.transport.broker_url == cluster.urls[0]
    readmitted: dict[str, float] = {}
    everyone = loop.create_future()
    t_kill = time.perf_counter()

    def listener(what: str, info: dict[str, Any]) -> None:
        if what == "admitted" and info.get("did") in on_node1:
            readmitted.setdefault(info["did"], time.perf_counter())
            if len(readmitted) == len(on_node1) and not everyone.done():
                everyone.set_result(None)

    coord.add_listener(listener)
    t_kill = time.perf_counter()
    cluster.kill(0)
    await asyncio.wait_for(everyone, 120)
    times = sorted(t - t_kill for t in readmitted.values())
    where = "and the coordinator " if coordinator_moves else ""
    print(f"[ejabberd] kill -9 of node 1 ({len(on_node1)} devices {where}on it): all re-admitted through "
          f"node 2 in {times[-1] * 1000:.0f} ms (p50 {pct(times, .5) * 1000:.0f} ms)", flush=True)
    return {"devices_on_killed_node": len(on_node1), "coordinator_on_killed_node": coordinator_moves,
            "all_readmitted_ms": round(times[-1] * 1000, 1), "p50_readmitted_ms": round(pct(times, .5) * 1000, 1)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": f"{platform.machine()} python {platform.python_version()}",
                           "args": vars(args)}
    mosq = MosquittoBroker(MosquittoConfig.open_for_tests())
    mosq.start()
    try:
        out["mosquitto"] = await run_tier(Tier("mosquitto", mosq.url, mosq.url, None), args)
    finally:
        mosq.cleanup()
    cluster = EjabberdCluster(nodes=2, admins=(ADMIN.did,))
    await asyncio.to_thread(cluster.start)
    try:
        out["ejabberd"] = await run_tier(Tier("ejabberd", cluster.url, ",".join(reversed(cluster.urls)), cluster),
                                         args)
    finally:
        await asyncio.to_thread(cluster.cleanup)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=200)
    p.add_argument("--devices", type=int, default=1000)
    p.add_argument("--failover", type=int, default=200, help="devices on the killed node (0: skip)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    out = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
