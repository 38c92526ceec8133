"""Staged roll-out benchmark: one change rolled out to N real devices in 4 stages over loopback Mosquitto.

    python3 bench/rollout_bench.py [--devices 5000] [--workers 2] [--canary 5%] [--steps 25,50,100]
                                   [--quick] [--json bench/results/rollout.json]

The coordinator and the operator run in this process; the devices (each a real :class:`Device`
with its own key, DeviceCredential and MQTT connection, reporting ``app.crashes = 0``) run in
``--workers`` child processes, so this process's CPU time is the coordinator's (plus the
operator's status polls). One ``rollout.start`` (canary, then the growth steps; gates:
applied >= 99 %, failed <= 1 %, ``app.crashes <= 0``, a stage timeout) runs to ``completed``.

Reported: time per stage (started → gates passed → promoted, from ``rollout.status``), the whole
roll-out's wall time, coordinator CPU seconds per device (``time.process_time`` of this process
over the roll-out, and the coordinator's own ``cpu_seconds`` metric), λ, convergence p50/p95,
the cost ratio, and a check that every device ended on the change and no device outside a stage
saw it before its stage started. ``--quick``: 200 devices, one worker.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import resource
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUP = "room:rollout"
KEY = "ui.layout"
VALUE = "v2"
FINAL = {"completed", "aborted", "rolled_back", "cancelled"}


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# -- the device side (child processes) -------------------------------------------------------


def worker(conn: Connection, url: str, coordinator: str, devices: list[tuple[str, dict[str, Any]]]) -> None:
    """Connect ``devices`` (seed hex, credential), report ready, record when each applies the change."""
    _raise_fd_limit()
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(_worker(conn, url, coordinator, devices))


async def _worker(conn: Connection, url: str, coordinator: str, devices: list[tuple[str, dict[str, Any]]]) -> None:
    from sdk.coord.device import Device
    from sdk.identity import Key

    applied: dict[str, float] = {}
    clients: list[Device] = []
    for seed, cred in devices:
        key = Key.from_seed(bytes.fromhex(seed))

        def on_config(cfg: Any, _did: str = key.did) -> None:
            if cfg.state.get(KEY) == VALUE and _did not in applied:
                applied[_did] = time.time()

        clients.append(Device(key, cred, broker=url, coordinator=coordinator, on_config=on_config,
                              heartbeat_ttl=600, auth_timeout=120))
    sem = asyncio.Semaphore(48)

    async def start(d: Device) -> None:
        async with sem:
            await d.connect()
            await d.wait_admitted(120)
            await d.report_properties({"app.crashes": 0})

    t0 = time.perf_counter()
    await asyncio.gather(*(start(d) for d in clients))
    conn.send({"ready": len(clients), "connect_s": time.perf_counter() - t0})
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, conn.recv)          # "stop"
    conn.send({"applied": applied, "cpu_s": time.process_time()})
    await asyncio.gather(*(d.aclose() for d in clients), return_exceptions=True)


# -- the coordinator side ----------------------------------------------------------------------


def machine() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from operator_bench import machine as describe

    return str(describe())


def stage_times(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage: size, members, applied, failed, and seconds started → passed → promoted."""
    out = []
    for s in doc.get("stages") or []:
        started, passed, promoted = s.get("started"), s.get("passed"), s.get("promoted")
        row: dict[str, Any] = {k: s.get(k) for k in ("index", "size", "members", "applied", "failed")}
        if isinstance(started, (int, float)):
            if isinstance(passed, (int, float)):
                row["gates_passed_s"] = round(passed - started, 3)
            end = promoted if isinstance(promoted, (int, float)) else passed
            if isinstance(end, (int, float)):
                row["stage_s"] = round(end - started, 3)
        out.append(row)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from brokers.mosquitto import MosquittoBroker, MosquittoConfig
    from sdk.cli.rollout_cmds import parse_canary, parse_steps
    from sdk.coord.coordinator import Coordinator, operator_credential
    from sdk.coord.operator import OperatorClient
    from sdk.identity import Key, TrustPolicy

    out: dict[str, Any] = {"machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                           "quick": args.quick, "devices": args.devices, "workers": args.workers}
    broker = MosquittoBroker(MosquittoConfig.open_for_tests())
    broker.start()
    tmp = tempfile.TemporaryDirectory(prefix="rollout-bench-")
    issuer, ckey, okey = Key.generate(), Key.generate(), Key.generate()
    coord = Coordinator(ckey, broker=broker.url, data_dir=Path(tmp.name), trust=TrustPolicy({}), issuer=issuer,
                        heartbeat_ttl=600)
    await coord.start()
    op = OperatorClient(broker.url, okey, operator_credential(issuer, okey.did, roles=("admin",)),
                        coordinator=ckey.did, timeout=60)
    await op.connect()
    procs: list[Any] = []
    pipes: list[Connection] = []
    try:
        seeds = [os.urandom(32) for _ in range(args.devices)]
        creds = [coord.issue_device_credential(Key.from_seed(s).did, kind="phone", groups=[GROUP]) for s in seeds]
        ctx = multiprocessing.get_context("spawn")
        for w in range(args.workers):
            part = [(seeds[i].hex(), creds[i]) for i in range(w, args.devices, args.workers)]
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker, args=(child, broker.url, ckey.did, part), daemon=True)
            proc.start()
            procs.append(proc)
            pipes.append(parent)
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        ready = [await loop.run_in_executor(None, pipe.recv) for pipe in pipes]
        out["connect_and_auth_s"] = round(time.perf_counter() - t0, 2)
        print(f"{args.devices} devices connected, admitted and reporting in {out['connect_and_auth_s']} s "
              f"({args.workers} worker processes)", flush=True)
        assert sum(r["ready"] for r in ready) == args.devices
        if "rollout.start" not in coord.operations:
            print("rollout.start is not an operation of this coordinator: nothing to measure", flush=True)
            out["skipped"] = "rollout.start is not registered"
            for pipe in pipes:
                pipe.send("stop")
            return out

        params = {"name": "bench", "target": {"group": GROUP}, "change": {"set": {KEY: VALUE}},
                  "stages": {"canary": parse_canary(args.canary), "growth": {"steps": parse_steps(args.steps)}},
                  "bake": args.bake,
                  "gates": {"min_applied": 0.99, "max_failed": 0.01, "timeout": args.stage_timeout,
                            "health": [{"property": "app.crashes", "op": "le", "value": 0}]}}
        cpu0, wall0, t_start = time.process_time(), time.perf_counter(), time.time()
        started = await op.call("rollout.start", params, timeout=60)
        rid = started["id"]
        print(f"rollout {rid}: stages {started.get('stages')}", flush=True)
        doc: dict[str, Any] = {}
        seen_stage = -1
        while True:
            doc = await op.call("rollout.status", {"id": rid}, timeout=60)
            if doc.get("stage") != seen_stage:
                seen_stage = doc.get("stage", seen_stage)
                print(f"  {time.perf_counter() - wall0:7.2f} s  stage {seen_stage}  state {doc.get('state')}",
                      flush=True)
            if doc.get("state") in FINAL or time.perf_counter() - wall0 > args.max_seconds:
                break
            await asyncio.sleep(args.poll)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
        for pipe in pipes:
            pipe.send("stop")
        reports = [await loop.run_in_executor(None, pipe.recv) for pipe in pipes]
        applied: dict[str, float] = {}
        for r in reports:
            applied.update(r["applied"])
        stages = stage_times(doc)
        early = _early_devices(coord, rid, applied)
        metrics = doc.get("metrics") or {}
        out.update({
            "rollout": rid, "state": doc.get("state"), "reason": doc.get("reason"),
            "stage_sizes": started.get("stages"), "stages": stages,
            "rollout_wall_s": round(wall, 2),
            "applied_devices": len(applied),
            "coordinator_cpu_s": round(cpu, 3),
            "coordinator_cpu_ms_per_device": round(cpu / args.devices * 1000, 3),
            "device_worker_cpu_s": round(sum(r["cpu_s"] for r in reports), 2),
            "metrics": metrics,
            "lambda_per_s": metrics.get("lambda"),
            "cost_ratio": metrics.get("cost_ratio"),
            "devices_applied_before_their_stage": early,
            "curve_points": len(doc.get("curve") or []),
            "load_average_after": round(os.getloadavg()[0], 1),
            "first_apply_after_start_s": round(min(applied.values()) - t_start, 3) if applied else None,
        })
        print(f"rollout {doc.get('state')} in {wall:.1f} s: {len(applied)}/{args.devices} devices applied; "
              f"coordinator CPU {cpu:.2f} s ({cpu / args.devices * 1000:.2f} ms per device); "
              f"λ {metrics.get('lambda')}; cost ratio {metrics.get('cost_ratio')}", flush=True)
        for s in stages:
            print(f"  stage {s.get('index')}: {s.get('size')} devices, gates passed in {s.get('gates_passed_s')} s, "
                  f"stage {s.get('stage_s')} s", flush=True)
        return out
    finally:
        for proc in procs:
            proc.join(60)
            if proc.is_alive():
                proc.kill()
        await op.aclose()
        await coord.stop()
        broker.cleanup()
        tmp.cleanup()


def _early_devices(coord: Any, rid: str, applied: dict[str, float]) -> int:
    """Devices that applied the change before their stage was committed (must be 0)."""
    r = coord.rollouts.get(rid)
    early = 0
    for did, t in applied.items():
        m = r.members.get(did)
        begun = r.started[m.stage] if m is not None else None
        if m is None or begun is None or t < begun:
            early += 1
    return early


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=2, help="device processes")
    parser.add_argument("--canary", default="5%")
    parser.add_argument("--steps", default="25,50,100", help="growth stages after the canary (4 stages in all)")
    parser.add_argument("--bake", type=float, default=1.0, help="seconds each stage bakes")
    parser.add_argument("--stage-timeout", type=float, default=300.0)
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between rollout.status polls")
    parser.add_argument("--max-seconds", type=float, default=1200.0)
    parser.add_argument("--quick", action="store_true", help="200 devices, one worker (a smoke run)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.devices, args.workers = 200, 1
    _raise_fd_limit()
    logging.basicConfig(level=logging.ERROR)
    out = asyncio.run(run(args))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
