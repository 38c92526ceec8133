#!/usr/bin/env python3
"""Run the CPU benchmarks one after another, each with its default settings; JSON goes to bench/results/.

    python3 bench/run_all.py                   # every benchmark below (tens of minutes)
    python3 bench/run_all.py security identity # a subset, by name
    python3 bench/run_all.py --list

Each benchmark prints its own table; this runner has the others write ``bench/results/<name>.json`` and ends
with a one-line summary per benchmark (exit status, seconds). GPU figures: bench/gpu/run.sh.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: name -> script (quickest first)
BENCHES: dict[str, str] = {
    "security": "security_bench.py",
    "identity": "identity_bench.py",
    "mqtt_raw": "mqtt_raw_bench.py",
    "messaging": "messaging_bench.py",
    "coord": "coord_bench.py",
    "fleet": "fleet_bench.py",
    "inference": "inference_bench.py",
    "http": "http_bench.py",
    "mesh": "mesh_bench.py",
    "rollout": "rollout_bench.py",
}
#: benchmarks whose ``--json`` is a flag (JSON on stdout) rather than a path: run with their table only
TABLE_ONLY = {"mqtt_raw", "messaging"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(BENCHES)})")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, script in BENCHES.items():
            print(f"{name:10} bench/{script}")
        return 0
    unknown = [n for n in args.names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    summary: list[tuple[str, int, float]] = []
    for name in args.names or list(BENCHES):
        path = HERE / BENCHES[name]
        print(f"\n=== {name}: {path.name}", flush=True)
        started = time.perf_counter()
        extra = [] if name in TABLE_ONLY else ["--json", str(results / f"{name}.json")]
        rc = subprocess.call([sys.executable, str(path), *extra])
        summary.append((name, rc, time.perf_counter() - started))
    print("\nbenchmark   status  seconds")
    for name, rc, seconds in summary:
        print(f"{name:10}  {'ok' if rc == 0 else f'rc={rc}':6}  {seconds:7.1f}")
    return 0 if all(rc == 0 for _, rc, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
