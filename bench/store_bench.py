"""State-store benchmark: a 1,000-event commit loop on SQLite and on PostgreSQL.

    python3 bench/store_bench.py [--events 1000] [--targets 1] [--json bench/results/store.json]

Each event is what the coordinator commits for a device event: one transaction recording the
event, marking it processed and writing one new desired version per target device. Runs, each
on a fresh store: SQLite (``durability`` normal and full), PostgreSQL on the test server
(``fsync=off``, as the ``postgres`` fixture runs it) and on a durable one (``fsync=on``,
``synchronous_commit=on``), unfenced and fenced on the lease (the check an HA coordinator adds
to every write). The server runs on this machine, over loopback TCP.

Reported per run: commits/s, per-commit latency p50/p99 (wall), and CPU seconds per 1,000
commits of this process (``time.process_time``) and, for PostgreSQL, of the server's processes
(``/proc``): CPU time is what load from other processes on the machine distorts least.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _server_cpu(postmaster: int) -> float:
    """User + system CPU seconds of the postmaster and its live children (the backends, which
    each start a session of their own, so a process group would miss them)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(entry.name) == postmaster or int(fields[1]) == postmaster:   # fields[1]: the parent pid
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def run(url: str, *, events: int, targets: int, fenced: bool, durability: str = "normal",
        postmaster: int | None = None) -> dict[str, Any]:
    from sdk.coord.coordinator.store import open_store

    store = open_store(url, durability=durability)
    if fenced:
        token = store.acquire_lease("bench", 3600)
        store.fence(token, holder="bench")
    dids = [f"did:key:z6Mkbench{i:04d}" for i in range(max(targets, 50))]
    lat: list[float] = []
    cpu0, srv0, wall0 = time.process_time(), _server_cpu(postmaster) if postmaster else 0.0, time.perf_counter()
    for i in range(events):
        chosen = [dids[(i + k) % len(dids)] for k in range(targets)]
        t = time.perf_counter()
        out = store.commit({d: ({"ui.width": 800 + i % 7, "seq": i}, ("screen-rule",)) for d in chosen},
                           event_id=f"e-{i:06d}", event=("did:key:z6Mksensor", "screen_available", {"w": i}))
        lat.append(time.perf_counter() - t)
        assert len(out) == targets
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    server = (_server_cpu(postmaster) - srv0) if postmaster else None
    store.close()
    q = statistics.quantiles(lat, n=100)
    per_k = 1000 / events
    return {"commits_per_s": round(events / wall), "p50_ms": round(q[49] * 1e3, 3), "p99_ms": round(q[98] * 1e3, 3),
            "client_cpu_s_per_1k": round(cpu * per_k, 3),
            "server_cpu_s_per_1k": None if server is None else round(server * per_k, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--targets", type=int, default=1, help="devices each event commits a version for")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from brokers.postgres import PostgresServer

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, durability, fenced in (("sqlite normal", "normal", False), ("sqlite normal, fenced", "normal", True),
                                         ("sqlite full", "full", False)):
            results[name] = run(str(Path(tmp) / f"{len(results)}.db"), events=args.events, targets=args.targets,
                                fenced=fenced, durability=durability)
            print(f"{name:32s} {results[name]}", flush=True)
    for label, durable in (("postgres (fsync off)", False), ("postgres durable", True)):
        with PostgresServer(durable=durable) as server:
            postmaster = int((server.data_dir / "postmaster.pid").read_text().split()[0])
            for fenced in (False, True):
                name = label + (", fenced" if fenced else "")
                results[name] = run(server.fresh_url(), events=args.events, targets=args.targets, fenced=fenced,
                                    durability="full" if durable else "normal", postmaster=postmaster)
                print(f"{name:32s} {results[name]}", flush=True)
    doc = {"events": args.events, "targets": args.targets, "cpus": os.cpu_count(), "results": results}
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
