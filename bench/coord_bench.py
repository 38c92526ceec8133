"""Coordinator benchmark on loopback Mosquitto (one run, one machine).

    python3 bench/coord_bench.py [--auth 300] [--events 300] [--devices 1000] [--json out.json]

1. authentication handshake: a first admission, direct (the device's presentation over its
   request's own id, the coordinator's presentation in the reply: one round trip) and hello first
   (two round trips), and resumed (the single-use next_challenge from the last admission, one
   round trip, no coordinator presentation): p50/p99 (target p50 <= 2 ms);
2. event -> config applied on the target device (display event, rules, SQLite commit, signed
   push, device verification, app callback): p50/p99 (target p50 <= 5 ms, p99 <= 20 ms);
3. fan-out: one event retargets N simulated devices (each its own MQTT connection, own
   key, own verification); time until all applied, and until the coordinator saw every report.
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

from brokers.mosquitto import MosquittoBroker, MosquittoConfig
from sdk.coord.coordinator import Coordinator, parse_rules
from sdk.coord.device import Device
from sdk.coord.events import screen_available
from sdk.identity import Key, TrustPolicy

RULES = [{
    "name": "companion", "event": "screen_available", "when": {"sender.kind": "display"},
    "target": {"select": "group", "group_prefix": "room:", "where": {"device.kind": "phone"}},
    "config": {"ui.layout": "companion", "ui.companion.resolution": "{event.width}x{event.height}",
               "ui.companion.width": "{event.width}", "ui.companion.height": "{event.height}"},
}]


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"machine": f"{platform.machine()} {platform.processor() or ''} "
                                      f"python {platform.python_version()}".strip()}
    broker = MosquittoBroker(MosquittoConfig.open_for_tests())
    broker.start()
    tmp = tempfile.TemporaryDirectory(prefix="coord-bench-")
    issuer, ckey = Key.generate(), Key.generate()
    coord = Coordinator(ckey, broker=broker.url, data_dir=Path(tmp.name), trust=TrustPolicy({}), issuer=issuer,
                        rules=parse_rules(RULES), heartbeat_ttl=600)
    await coord.start()
    devices: list[Device] = []

    async def make(kind: str, room: str, on_config: Any = None, *, connect: bool = True) -> Device:
        key = Key.generate()
        cred = coord.issue_device_credential(key.did, kind=kind, groups=[room])
        dev = Device(key, cred, broker=broker.url, coordinator=ckey.did, on_config=on_config, heartbeat_ttl=600,
                     auth_timeout=30)
        if connect:
            await dev.connect()
        devices.append(dev)
        return dev

    try:
        # 1. authentication handshake
        dev = await make("phone", "room:auth")
        forms = (("auth_direct_ms", False, True, "first admission, direct (present only, 1 round trip)"),
                 ("auth_full_ms", False, False, "first admission, hello first (hello + present, 2 round trips)"),
                 ("auth_resumed_ms", True, True, "resumed (1 round trip, no coordinator presentation)"))
        for name, resume, direct, label in forms:
            dev.direct_admission = direct
            for _ in range(20):
                await dev.authenticate(resume=resume)
            lat = []
            for _ in range(args.auth):
                t0 = time.perf_counter()
                await dev.authenticate(resume=resume)
                lat.append((time.perf_counter() - t0) * 1000)
            out[name] = {"n": len(lat), "p50": round(pct(lat, .5), 3), "p99": round(pct(lat, .99), 3)}
            print(f"auth handshake, {label}: p50 {out[name]['p50']:.3f} ms  p99 {out[name]['p99']:.3f} ms "
                  f"(n={len(lat)}; target p50 <= 2 ms)", flush=True)

        # 2. event -> config applied on the target
        applied: dict[int, float] = {}
        waiter: dict[str, Any] = {}

        def on_config(cfg: Any) -> None:
            applied[cfg.version] = time.perf_counter()
            fut = waiter.get("f")
            if fut is not None and not fut.done():
                fut.set_result(cfg.version)

        display = await make("display", "room:e2e")
        await make("phone", "room:e2e", on_config)
        lat = []
        loop = asyncio.get_running_loop()
        for i in range(args.events + 20):
            waiter["f"] = loop.create_future()
            t0 = time.perf_counter()
            await display.publish_event(screen_available(800 + i, 600))
            await asyncio.wait_for(waiter["f"], 10)
            if i >= 20:
                lat.append((time.perf_counter() - t0) * 1000)
        out["event_to_applied_ms"] = {"n": len(lat), "p50": round(pct(lat, .5), 3), "p99": round(pct(lat, .99), 3),
                                      "mean": round(statistics.fmean(lat), 3)}
        print(f"event -> config applied: p50 {out['event_to_applied_ms']['p50']:.3f} ms  "
              f"p99 {out['event_to_applied_ms']['p99']:.3f} ms (n={len(lat)}; targets p50 <= 5, p99 <= 20)",
              flush=True)

        # 3. fan-out
        for n in args.devices:
            room = f"room:fan{n}"
            done: list[float] = []
            all_done = loop.create_future()

            def fan_cb(cfg: Any, _n: int = n, _done: list[float] = done, _fut: Any = all_done) -> None:
                _done.append(time.perf_counter())
                if len(_done) == _n and not _fut.done():
                    _fut.set_result(None)

            t0 = time.perf_counter()
            fan = [await make("phone", room, fan_cb, connect=False) for _ in range(n)]
            sem = asyncio.Semaphore(64)

            async def connect(d: Device) -> None:
                async with sem:
                    await d.connect()

            await asyncio.gather(*(connect(d) for d in fan))
            setup = time.perf_counter() - t0
            src = await make("display", room)
            converged = loop.create_future()
            coord.add_listener(lambda what, info, _f=converged: (
                _f.set_result(info) if what == "converged" and info["targets"] == n and not _f.done() else None))
            t0 = time.perf_counter()
            await src.publish_event(screen_available(1920, 1080))
            await asyncio.wait_for(all_done, 300)
            t_all = time.perf_counter() - t0
            info = await asyncio.wait_for(converged, 300)
            t_conv = time.perf_counter() - t0
            out.setdefault("fanout", []).append({
                "devices": n, "all_applied_ms": round(t_all * 1000, 1),
                "coordinator_converged_ms": round(info["seconds"] * 1000, 1), "wall_converged_ms": round(t_conv * 1000, 1),
                "connect_and_auth_s": round(setup, 2)})
            print(f"fan-out to {n} devices: all applied in {t_all * 1000:.1f} ms; coordinator convergence "
                  f"{info['seconds'] * 1000:.1f} ms (setup: {n} connects + handshakes in {setup:.1f} s)", flush=True)
            for d in fan:
                await d.aclose()
                devices.remove(d)
        out["coordinator_metrics"] = coord.metrics.summary()
    finally:
        for d in devices:
            await d.aclose()
        await coord.stop()
        broker.cleanup()
        tmp.cleanup()
    return out


async def revoke_to_refusal(broker: str = "mosquitto", *, rounds: int = 5) -> dict[str, Any]:
    """Seconds from ``Coordinator.revoke(did)`` until the admitted device is told it is revoked
    (the coordinator has refused it by then), per round; ``broker``: "mosquitto" or "embedded"."""
    from brokers.embedded import OWN_TOPICS_ACL, EmbeddedBroker
    from sdk.coord.device import DeviceState

    issuer, ckey = Key.generate(), Key.generate()
    server: Any
    if broker == "embedded":
        server = EmbeddedBroker(acl=OWN_TOPICS_ACL, coordinator=ckey.did)
        await server.start()
    else:
        server = MosquittoBroker(MosquittoConfig.open_for_tests())
        server.start()
    tmp = tempfile.TemporaryDirectory(prefix="coord-revoke-")
    coord = Coordinator(ckey, broker=server.url, data_dir=Path(tmp.name), trust=TrustPolicy({}), issuer=issuer)
    await coord.start()
    seconds: list[float] = []
    try:
        for _ in range(rounds):
            key = Key.generate()
            dev = Device(key, coord.issue_device_credential(key.did, kind="phone", groups=["room:r"]),
                         broker=server.url, coordinator=ckey.did, auth_timeout=30)
            await dev.connect()
            try:
                t0 = time.perf_counter()
                await coord.revoke(key.did)
                while dev.state is not DeviceState.REVOKED:
                    if time.perf_counter() - t0 > 10:
                        raise TimeoutError("device not told of its revocation within 10 s")
                    await asyncio.sleep(0.0005)
                seconds.append(time.perf_counter() - t0)
            finally:
                await dev.aclose()
    finally:
        await coord.stop()
        if broker == "embedded":
            await server.stop()
        else:
            server.cleanup()
        tmp.cleanup()
    return {"seconds": max(seconds), "runs": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--auth", type=int, default=300)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--devices", type=int, nargs="*", default=[1000])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    out = asyncio.run(run(args))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
