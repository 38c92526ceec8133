"""Fleet benchmark: many simulated devices across processes, the coordinator in its own process.

    python3 bench/fleet_bench.py [--sizes 1000 5000 10000] [--workers 4] [--json bench/results/fleet.json]

Mosquitto (loopback, open mode) is the broker. Each device is a real :class:`~sdk.coord.device.Device`:
its own key, credential and MQTT connection, its own signature checks; ``--workers`` processes
hold them, at a lower scheduling priority (``--sim-nice``, default 10) so that on a machine of few
cores they take the cycles the coordinator and the broker leave, as a fleet on its own hardware
would, instead of four sixths of every core. The coordinator runs in a process of its own, so its
CPU seconds and RSS (read from ``/proc/PID``) measure the coordinator and not the simulator. The
fleet grows in steps to each
size; per step: admission time and rate, coordinator CPU per admitted device, one event → every
device applied, coordinator convergence, coordinator RSS. Then the broker restarts with the whole
fleet connected: time until every device is admitted again, and converged on a new event (none
lost). The machine's load average is recorded with every figure (other work skews them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROOM = "room:fleet"
RULES = [{
    "name": "fleet", "event": "screen_available", "when": {"sender.kind": "display"},
    "target": {"select": "group", "group_prefix": "room:", "where": {"device.kind": "phone"}},
    "config": {"ui.companion.width": "{event.width}", "ui.companion.height": "{event.height}"},
}]
TICKS = os.sysconf("SC_CLK_TCK")


def raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def load() -> float:
    return round(os.getloadavg()[0], 2)


def _pymalloc() -> dict[str, float]:
    """pymalloc's arenas (MB): held from the OS, in live blocks, and free inside them."""
    import re

    with tempfile.TemporaryFile() as f:
        saved = os.dup(2)
        try:
            os.dup2(f.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        f.seek(0)
        text = f.read().decode(errors="replace")

    def number(label: str) -> float:
        m = re.search(rf"{label}\s*=\s*([\d,]+)", text)
        return int(m.group(1).replace(",", "")) / 2**20 if m else 0.0

    m = re.search(r"arenas \* (\d+) bytes/arena\s*=\s*([\d,]+)", text)
    arenas = int(m.group(2).replace(",", "")) / 2**20 if m else 0.0
    return {"pymalloc_arenas_mb": round(arenas, 1), "pymalloc_used_mb": round(number("# bytes in allocated blocks"), 1),
            "pymalloc_free_mb": round(arenas - number("# bytes in allocated blocks"), 1)}


def heap() -> dict[str, Any]:
    """This process's allocator state: Python's live blocks and glibc's heap (``mallinfo2``) in MB:
    in use, free inside the heap (held, not returned: fragmentation) and mmapped."""
    import ctypes

    out: dict[str, Any] = {"py_blocks": sys.getallocatedblocks(), **_pymalloc()}
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return out

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
            "keepcost")]

    if not hasattr(libc, "mallinfo2"):
        return out
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    mb = 2**20
    out.update({"heap_mb": round(info.arena / mb, 1), "in_use_mb": round(info.uordblks / mb, 1),
                "free_in_heap_mb": round(info.fordblks / mb, 1), "mmapped_mb": round(info.hblkhd / mb, 1)})
    return out


# ---------------------------------------------------------------------------------- coordinator process
def coordinator_main(args: argparse.Namespace) -> None:
    """The coordinator in its own process: stats on request (one JSON line per ``stats`` line on stdin)."""
    from sdk.coord.coordinator import Coordinator, parse_rules
    from sdk.identity import Key, TrustPolicy

    logging.basicConfig(level=logging.ERROR)
    raise_nofile()
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(args.tracemalloc)
    issuer, ckey = Key.from_seed(bytes.fromhex(args.issuer_seed)), Key.from_seed(bytes.fromhex(args.coord_seed))

    async def run() -> None:
        coord = Coordinator(ckey, broker=args.broker, data_dir=args.data, trust=TrustPolicy({}), issuer=issuer,
                            rules=parse_rules(RULES), heartbeat_ttl=600, max_admissions=args.max_admissions,
                            # a persistent session: requests sent while it reconnects wait in the broker
                            persistent=True, client_id="fleet-bench-coordinator",
                            # a fan-out past max_pending waits for room instead of failing queue_full
                            queue_wait=args.queue_wait)
        admitted = [0]
        converged: list[dict[str, Any]] = []
        committed: list[float] = []                 # when each push's versions were committed

        def listen(what: str, info: dict[str, Any]) -> None:
            if what == "admitted":
                admitted[0] += 1
            elif what == "committed":
                committed.append(time.monotonic())
            elif what == "converged":
                converged.append({"targets": info["targets"], "seconds": info["seconds"],
                                  "failures": info.get("failures"), "at": time.monotonic()})

        coord.add_listener(listen)
        sent_at: list[float] = []                   # when each push's last config was sent (and acked)
        push_desired = coord.push_desired

        async def timed_push(*a: Any, **kw: Any) -> None:
            await push_desired(*a, **kw)
            sent_at.append(time.monotonic())

        coord.push_desired = timed_push             # type: ignore[method-assign]
        import gc

        gc_time = [0.0, 0.0, 0]                 # CPU seconds in collections, start of the current one, count

        def gc_clock(phase: str, info: dict[str, Any]) -> None:
            if phase == "start":
                gc_time[1] = time.process_time()
            else:
                gc_time[0] += time.process_time() - gc_time[1]
                gc_time[2] += 1

        gc.callbacks.append(gc_clock)
        if args.gc_threshold:
            gc.set_threshold(args.gc_threshold, 10, 10)
        await coord.start()
        if args.gc_freeze:
            import gc

            gc.collect()
            gc.freeze()         # what start() made is left out of every later collection
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def stats() -> str:
            return json.dumps({"admitted": admitted[0], "registry": len(coord.registry),
                               "admission": coord.admission.snapshot(), "converged": converged[-5:],
                               "committed_at": committed[-1] if committed else None,
                               "sent_at": sent_at[-1] if sent_at else None,
                               "gc_cpu_s": round(gc_time[0], 3), "gc_collections": gc_time[2]})

        async def snapshot() -> str:
            return stats()

        baseline: list[Any] = []

        async def memory() -> str:
            """Python allocations grown since the first call, grouped by where they were made."""
            import gc
            import tracemalloc

            gc.collect()
            snap = tracemalloc.take_snapshot()
            if not baseline:
                baseline.append(snap)
            return json.dumps({"registry": len(coord.registry), **memory_breakdown(snap, baseline[0])})

        async def trim() -> str:
            """RSS before and after a full collection, then after glibc's ``malloc_trim(0)``."""
            import ctypes
            import gc

            pid = os.getpid()
            before = proc_rss_mb(pid)
            gc.collect()
            collected = proc_rss_mb(pid)
            ctypes.CDLL(None).malloc_trim(0)
            return json.dumps({"rss_mb": round(before, 1), "after_gc_mb": round(collected, 1),
                               "after_malloc_trim_mb": round(proc_rss_mb(pid), 1)})

        profiling: list[Any] = []

        async def profile(path: str) -> str:
            """Stop the running profile (written to its path); start one for ``path`` unless "-"."""
            import cProfile

            if profiling:
                prof, out = profiling.pop()
                prof.disable()
                prof.dump_stats(out)
            if path != "-":
                prof = cProfile.Profile(time.process_time)     # CPU time: other load does not count
                profiling.append((prof, path))
                prof.enable()
            return json.dumps({"profile": path})

        def reader() -> None:
            for line in sys.stdin:
                if line.startswith("profile "):
                    path = line.split(" ", 1)[1].strip()
                    print(asyncio.run_coroutine_threadsafe(profile(path), loop).result(), flush=True)
                elif line.strip() == "heap":              # walks every pymalloc pool: not polled
                    print(json.dumps(heap()), flush=True)
                elif line.strip() == "trim":
                    print(asyncio.run_coroutine_threadsafe(trim(), loop).result(), flush=True)
                elif line.strip() == "stats":
                    print(asyncio.run_coroutine_threadsafe(snapshot(), loop).result(), flush=True)
                elif line.strip() == "memory":
                    print(asyncio.run_coroutine_threadsafe(memory(), loop).result(), flush=True)
                elif line.strip() == "stop":
                    break
            loop.call_soon_threadsafe(finish)

        def finish() -> None:
            if not done.done():
                done.set_result(None)

        threading.Thread(target=reader, daemon=True).start()
        print(json.dumps({"ready": True, "did": coord.did}), flush=True)
        await done
        await coord.stop()

    asyncio.run(run())


#: helpers that allocate on behalf of their caller: an allocation there belongs to the caller
_GENERIC = tuple(os.path.join("sdk", *p.split("/")) for p in (
    "identity/hazmat/json.py", "identity/hazmat/b64.py", "coord/coordinator/values.py"))


def _site(tb: Any) -> str:
    """Where an allocation belongs: the innermost frame in the project's own code (the allocation
    itself when it is there, else the project call that led to it), with the allocating frame."""
    frames = list(reversed(tb))             # tracemalloc lists the oldest first: innermost first here
    alloc = frames[0]
    own = next((f for f in frames if f"{os.sep}sdk{os.sep}" in f.filename
                and not f.filename.endswith(_GENERIC)), None)

    def name(f: Any) -> str:
        path = f.filename
        for root in (str(ROOT) + os.sep, sys.prefix + os.sep):
            if path.startswith(root):
                path = path[len(root):]
        return f"{path}:{f.lineno}"

    if own is None or own is alloc:
        return name(alloc)
    return f"{name(own)} -> {name(alloc)}"


def memory_breakdown(snap: Any, base: Any, limit: int = 40) -> dict[str, Any]:
    """Growth of ``snap`` over ``base`` by allocation site (see :func:`_site`), largest first."""
    import tracemalloc

    keep = [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen importlib._bootstrap>")]
    snap, base = snap.filter_traces(keep), base.filter_traces(keep)
    sites: dict[str, list[int]] = {}
    for diff in snap.compare_to(base, "traceback"):
        site = _site(diff.traceback)
        entry = sites.setdefault(site, [0, 0])
        entry[0] += diff.size_diff
        entry[1] += diff.count_diff
    total = sum(v[0] for v in sites.values())
    top = sorted(sites.items(), key=lambda kv: -kv[1][0])[:limit]
    return {"traced_mb": round(tracemalloc.get_traced_memory()[0] / 2**20, 2), "grown_mb": round(total / 2**20, 2),
            "sites": [{"site": k, "kb": round(v[0] / 1024, 1), "blocks": v[1]} for k, v in top]}


class CoordinatorProcess:
    def __init__(self, broker: str, data: str, issuer_seed: bytes, coord_seed: bytes, max_admissions: int,
                 queue_wait: float, tracemalloc_frames: int = 0, gc_freeze: bool = False,
                 gc_threshold: int = 0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--coordinator", "--broker", broker, "--data", data,
             "--issuer-seed", issuer_seed.hex(), "--coord-seed", coord_seed.hex(),
             "--max-admissions", str(max_admissions), "--queue-wait", str(queue_wait),
             "--tracemalloc", str(tracemalloc_frames), "--gc-threshold", str(gc_threshold),
             *(["--gc-freeze"] if gc_freeze else [])],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        first = json.loads(self._line())
        self.did: str = first["did"]
        self.pid = self.proc.pid

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"coordinator process exited ({self.proc.poll()})")
        return line

    def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stats\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def profile(self, path: str | None) -> None:
        """Profile the coordinator into ``path`` from now until the next call (None: stop)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"profile {path or '-'}\n")
        self.proc.stdin.flush()
        self._line()

    def heap(self) -> dict[str, Any]:
        """The coordinator's allocator state (see :func:`heap`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("heap\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def trim(self) -> dict[str, Any]:
        """The coordinator's RSS before and after ``gc.collect()`` and ``malloc_trim(0)``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("trim\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def memory(self) -> dict[str, Any]:
        """The coordinator's Python allocations grown since its first ``memory`` call (``--tracemalloc``)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("memory\n")
        self.proc.stdin.flush()
        return json.loads(self._line())

    def stop(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


# ---------------------------------------------------------------------------------- device worker processes
_SIM_GC = [0.0, 0.0]            # a worker's CPU seconds in garbage collection, start of the current one


def worker_main(index: int, broker: str, coordinator: str, issuer_seed: bytes, conn: Connection,
                display: bool, concurrency: int, gc_threshold: int = 0, nice: int = 0) -> None:
    """Hold devices of one process; answer the controller's commands over ``conn``."""
    logging.basicConfig(level=logging.ERROR)
    raise_nofile()
    if nice:                    # a fleet on its own hardware: the simulators take what is left
        os.nice(nice)
    import gc

    if gc_threshold:            # the simulator's own GC pauses are not the coordinator's cost
        gc.set_threshold(gc_threshold, 10, 10)

    def gc_clock(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            _SIM_GC[1] = time.process_time()
        else:
            _SIM_GC[0] += time.process_time() - _SIM_GC[1]

    gc.callbacks.append(gc_clock)
    asyncio.run(_worker(index, broker, coordinator, issuer_seed, conn, display, concurrency))


async def _worker(index: int, broker: str, coordinator: str, issuer_seed: bytes, conn: Connection,
                  display: bool, concurrency: int) -> None:
    from sdk.coord.coordinator.auth import device_credential
    from sdk.coord.device import Device, DeviceState
    from sdk.coord.events import screen_available
    from sdk.identity import Key

    issuer = Key.from_seed(issuer_seed)
    loop = asyncio.get_running_loop()
    devices: list[Device] = []
    applied: dict[str, str] = {}                    # did -> the width in its last config
    # per width: devices whose last config has it, and when the last of them applied it (kept as
    # configs arrive: the controller's polls cost O(1), not a walk over the worker's devices)
    at_width: dict[str, int] = {}
    last_at: dict[str, float] = {}
    failures: list[str] = []

    def make(kind: str) -> Device:
        key = Key.generate()
        cred = device_credential(issuer, key.did, kind=kind, groups=[ROOM])

        def on_config(cfg: Any, did: str = key.did) -> None:
            width, before = str(cfg.state.get("ui.companion.width")), applied.get(did)
            if before is not None:
                at_width[before] -= 1
            applied[did] = width
            at_width[width] = at_width.get(width, 0) + 1
            last_at[width] = time.monotonic()

        return Device(key, cred, broker=broker, coordinator=coordinator, heartbeat_ttl=600, auth_timeout=60,
                      renew_after=None, on_config=on_config if kind == "phone" else None)

    src = make("display") if display else None
    if src is not None:
        await src.connect()
    sem = asyncio.Semaphore(concurrency)
    profiling: list[Any] = []           # [(cProfile.Profile, file)] while a "profile" is on

    async def connect(dev: Device) -> float | None:
        async with sem:
            try:
                await dev.connect()
                return time.monotonic()
            except Exception as exc:  # noqa: BLE001 - counted and reported, the rest go on
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                return None

    while True:
        cmd, arg = await loop.run_in_executor(None, conn.recv)
        if cmd == "prepare":            # keys and credentials made before the clock starts
            batch = [make("phone") for _ in range(arg)]
            conn.send(len(batch))
        elif cmd == "connect":
            t0 = time.monotonic()
            done = await asyncio.gather(*(connect(d) for d in batch))
            devices.extend(batch)
            ok = [t for t in done if t is not None]
            conn.send({"ok": len(ok), "failed": len(done) - len(ok), "first": t0,
                       "last": max(ok) if ok else t0, "errors": failures[-3:],
                       "busy_retries": sum(d.busy_retries for d in batch)})
        elif cmd == "freeze":           # after a step: the devices made so far leave every later collection
            import gc

            gc.collect()
            gc.freeze()
            conn.send(gc.get_freeze_count())
        elif cmd == "event":
            assert src is not None
            t0 = time.monotonic()
            await src.publish_event(screen_available(arg, 1080))
            conn.send(t0)
        elif cmd == "state":            # arg: a width; 0 also counts the admitted devices (a walk)
            admitted = sum(1 for d in devices if d.state is DeviceState.ADMITTED) if not arg else None
            width = str(arg)
            conn.send({"devices": len(devices), "admitted": admitted, "at_version": at_width.get(width, 0),
                       "last_applied": last_at.get(width) if at_width.get(width) else None,
                       "display_admitted": src is None or src.state is DeviceState.ADMITTED,
                       "gc_cpu_s": _SIM_GC[0]})
        elif cmd == "profile":          # cProfile this worker until the next "profile" (arg: the file)
            if profiling:
                profiler, path = profiling.pop()
                profiler.disable()
                profiler.dump_stats(path)
            if arg is not None:
                import cProfile

                profiling.append((cProfile.Profile(), arg))
                profiling[0][0].enable()
            conn.send(True)
        elif cmd == "close":
            await asyncio.gather(*(d.aclose() for d in devices), return_exceptions=True)
            if src is not None:
                await src.aclose()
            conn.send(True)
            return


class Fleet:
    """The controller's handle on the worker processes."""

    def __init__(self, workers: int, broker: str, coordinator: str, issuer_seed: bytes, concurrency: int,
                 gc_threshold: int = 0, nice: int = 0) -> None:
        ctx = mp.get_context("fork")
        self.conns: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(workers):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(i, broker, coordinator, issuer_seed, child, i == 0,
                                                      concurrency, gc_threshold, nice), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        self.size = 0

    def cpu(self) -> float:
        """CPU seconds of every worker process (the simulated devices)."""
        return sum(proc_cpu(p.pid) for p in self.procs)

    def ask(self, cmd: str, arg: Any = None, *, only: int | None = None) -> list[Any]:
        conns = self.conns if only is None else [self.conns[only]]
        for c in conns:
            c.send((cmd, arg))
        return [c.recv() for c in conns]

    def grow(self, n: int) -> dict[str, Any]:
        share = [n // len(self.conns) + (1 if i < n % len(self.conns) else 0) for i in range(len(self.conns))]
        cpu0 = self.cpu()
        for c, k in zip(self.conns, share, strict=True):
            c.send(("prepare", k))
        for c in self.conns:
            c.recv()
        prepare_cpu = self.cpu() - cpu0       # keys, credentials, Device objects: before the clock
        replies = self.ask("connect")
        self.size += sum(r["ok"] for r in replies)
        return {"ok": sum(r["ok"] for r in replies), "failed": sum(r["failed"] for r in replies),
                "seconds": max(r["last"] for r in replies) - min(r["first"] for r in replies),
                "busy_retries": sum(r["busy_retries"] for r in replies), "prepare_cpu": prepare_cpu,
                "errors": [e for r in replies for e in r["errors"]][:5]}

    def wait(self, width: int, timeout: float) -> tuple[int, float | None]:
        """Poll until every device applied the config of the event with ``width`` (or the timeout):
        (applied, when the last one applied)."""
        deadline = time.monotonic() + timeout
        while True:
            states = self.ask("state", width)
            applied = sum(s["at_version"] for s in states)
            last = [s["last_applied"] for s in states if s["last_applied"] is not None]
            if applied >= self.size or time.monotonic() > deadline:
                return applied, max(last) if last else None
            time.sleep(0.1)

    def close(self) -> None:
        for c in self.conns:
            c.send(("close", None))
        for c, p in zip(self.conns, self.procs, strict=True):
            if c.poll(60):
                c.recv()
            p.join(10)
            if p.is_alive():
                p.kill()


def py_spy(folder: Path | None, label: str, pids: dict[str, int],
           strace: Path | None = None) -> list[subprocess.Popen[bytes]]:
    """Sample each pid's on-CPU Python stacks with py-spy (when ``folder`` is set) until
    :func:`stop_spies`: DIR/LABEL-NAME.txt, collapsed stacks (flamegraph input; sampled CPU time,
    not wall time, so a process waiting for the other core is not charged for it). With
    ``strace``: count each pid's system calls instead (``strace -c -f``: STRACE/LABEL-NAME.txt;
    the counts are exact, the times are inflated by strace itself)."""
    if folder is None and strace is None:
        return []
    spies = []
    for name, pid in pids.items():
        if strace is not None:
            strace.mkdir(parents=True, exist_ok=True)
            cmd = ["strace", "-c", "-f", "-p", str(pid), "-o", str(strace / f"{label}-{name}.txt")]
        else:
            assert folder is not None
            folder.mkdir(parents=True, exist_ok=True)
            cmd = ["py-spy", "record", "--pid", str(pid), "--rate", "250", "--nonblocking",
                   "--format", "raw", "-o", str(folder / f"{label}-{name}.txt")]
        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1.0)                     # the tracer attaches before the clock starts
    return spies


def stop_spies(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(signal.SIGINT)
    for spy in spies:
        spy.wait(30)


def settle(coord: CoordinatorProcess, limit: float) -> dict[str, Any]:
    """Wait (at most ``limit`` s) until the coordinator spends under 5 % of a core for half a second."""
    t0 = time.monotonic()
    cpu0 = last = proc_cpu(coord.pid)
    while time.monotonic() - t0 < limit:
        time.sleep(0.5)
        now = proc_cpu(coord.pid)
        if now - last < 0.025:
            break
        last = now
    return {"settle_s": round(time.monotonic() - t0, 2),
            "settle_coordinator_cpu_s": round(proc_cpu(coord.pid) - cpu0, 3)}


def wait_until(check: Any, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def converged_after(coord: CoordinatorProcess, t0: float, targets: int, timeout: float) -> dict[str, Any] | None:
    found: list[dict[str, Any]] = []

    def check() -> bool:
        found[:] = [c for c in coord.stats()["converged"] if c["at"] >= t0 and c["targets"] >= targets]
        return bool(found)

    return found[0] if wait_until(check, timeout, 0.2) else None


# ---------------------------------------------------------------------------------- the run
def broker_cpu(broker: Any) -> float:
    """CPU seconds of the Mosquitto process (0 when it is not running)."""
    proc = getattr(broker, "_proc", None)
    try:
        return proc_cpu(proc.pid) if proc is not None else 0.0
    except OSError:
        return 0.0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from brokers.mosquitto import MosquittoBroker, MosquittoConfig

    raise_nofile()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus python {platform.python_version()}",
        "workers": args.workers, "max_admissions": args.max_admissions, "queue_wait": args.queue_wait, "load_at_start": load(), "steps": []}
    broker = MosquittoBroker(MosquittoConfig.open_for_tests(persistence=True))
    broker.start()
    tmp = tempfile.TemporaryDirectory(prefix="fleet-bench-")
    issuer_seed, coord_seed = os.urandom(32), os.urandom(32)
    coord = CoordinatorProcess(broker.url, tmp.name, issuer_seed, coord_seed, args.max_admissions,
                               args.queue_wait, args.tracemalloc, args.gc_freeze, args.gc_threshold)
    out["gc_freeze"], out["trim"] = args.gc_freeze, args.trim
    out["gc_threshold"], out["sim_gc"], out["sim_nice"] = args.gc_threshold, args.sim_gc, args.sim_nice
    out["sim_gc_freeze"] = args.sim_gc_freeze
    fleet: Fleet | None = None
    try:
        time.sleep(1.0)
        idle_rss = proc_rss_mb(coord.pid)
        out["coordinator_idle_rss_mb"] = round(idle_rss, 1)
        out["coordinator_idle_heap"] = coord.heap()
        fleet = Fleet(args.workers, broker.url, coord.did, issuer_seed, args.concurrency, args.sim_gc, args.sim_nice)
        wait_until(lambda: all(s["display_admitted"] for s in fleet.ask("state", 0)), 60)
        if args.tracemalloc:
            coord.memory()              # the baseline: one device (the display) admitted
            out["memory"] = []
        version = 0
        for size in args.sizes:
            add = size - fleet.size
            if add <= 0:
                continue
            if args.profile:
                coord.profile(str(args.profile / f"admission-{size}.prof"))
                fleet.ask("profile", str(args.profile / f"worker-admission-{size}.prof"), only=len(fleet.conns) - 1)
            spies = py_spy(args.py_spy, f"admission-{size}", {"coordinator": coord.pid, "worker": fleet.procs[-1].pid},
                           args.strace)
            cpu0, sim0, brk0 = proc_cpu(coord.pid), fleet.cpu(), broker_cpu(broker)
            grown = fleet.grow(add)
            stop_spies(spies)
            cpu = proc_cpu(coord.pid) - cpu0
            sim, brk = fleet.cpu() - sim0 - grown["prepare_cpu"], broker_cpu(broker) - brk0
            step: dict[str, Any] = {
                "devices": fleet.size, "added": add, "admitted": grown["ok"], "failed": grown["failed"],
                "admission_s": round(grown["seconds"], 2),
                "admission_rate_per_s": round(grown["ok"] / grown["seconds"], 1) if grown["seconds"] else None,
                "coordinator_cpu_ms_per_device": round(cpu * 1000 / max(1, grown["ok"]), 3),
                "simulator_cpu_ms_per_device": round(sim * 1000 / max(1, grown["ok"]), 3),   # connecting only
                "simulator_prepare_cpu_ms_per_device": round(grown["prepare_cpu"] * 1000 / max(1, add), 3),
                "broker_cpu_ms_per_device": round(brk * 1000 / max(1, grown["ok"]), 3),
                "busy_retries": grown["busy_retries"], "errors": grown["errors"], "load_admission": load()}
            print(f"{fleet.size} devices: +{add} admitted in {grown['seconds']:.1f} s "
                  f"({step['admission_rate_per_s']}/s, coordinator {step['coordinator_cpu_ms_per_device']} ms CPU "
                  f"per device, simulators {step['simulator_cpu_ms_per_device']} ms, broker "
                  f"{step['broker_cpu_ms_per_device']} ms; {grown['busy_retries']} busy retries, {grown['failed']} failed; load {load()})",
                  flush=True)
            if args.sim_gc_freeze:
                # one device's process collects only its own objects; a simulator holding 2,500 would
                # walk all of them in each full collection: its long-lived ones are frozen instead
                fleet.ask("freeze")
            # the admission's tail (rows, status.json, the collector) is not the fan-out's: wait until
            # the coordinator is idle, and say how long that took and what it cost
            step.update(settle(coord, args.settle))
            # one event -> every device applied; the coordinator's convergence
            version += 1
            if args.profile:
                coord.profile(str(args.profile / f"fanout-{size}.prof"))
                fleet.ask("profile", str(args.profile / f"worker-fanout-{size}.prof"), only=len(fleet.conns) - 1)
            spies = py_spy(args.py_spy, f"fanout-{size}", {"coordinator": coord.pid, "worker": fleet.procs[-1].pid},
                           args.strace)
            cpu0, sim0, brk0 = proc_cpu(coord.pid), fleet.cpu(), broker_cpu(broker)
            gc0 = sum(s["gc_cpu_s"] for s in fleet.ask("state", 1))
            (t0,) = fleet.ask("event", 1000 + version, only=0)
            applied, last = fleet.wait(1000 + version, args.timeout)
            conv = converged_after(coord, t0, fleet.size, args.timeout)
            stop_spies(spies)
            if args.profile:
                coord.profile(None)
                fleet.ask("profile", None, only=len(fleet.conns) - 1)
            step.update({
                "event_applied": applied,
                "event_all_applied_s": round(last - t0, 3) if last is not None and applied >= fleet.size else None,
                "coordinator_converged_s": round(conv["seconds"], 3) if conv else None,
                "coordinator_cpu_ms_per_device_fanout": round((proc_cpu(coord.pid) - cpu0) * 1000 / fleet.size, 3),
                "simulator_cpu_ms_per_device_fanout": round((fleet.cpu() - sim0) * 1000 / fleet.size, 3),
                "broker_cpu_ms_per_device_fanout": round((broker_cpu(broker) - brk0) * 1000 / fleet.size, 3),
                "simulator_gc_ms_per_device_fanout": round(
                    (sum(s["gc_cpu_s"] for s in fleet.ask("state", 1)) - gc0) * 1000 / fleet.size, 3),
                "load_fanout": load()})
            stats = coord.stats()
            if stats.get("committed_at"):     # the event's serial part: delivery, rules, one commit
                step["event_to_commit_s"] = round(stats["committed_at"] - t0, 3)
            if stats.get("sent_at"):          # the last config sent (and acknowledged by the broker)
                step["event_to_last_sent_s"] = round(stats["sent_at"] - t0, 3)
            rss = proc_rss_mb(coord.pid)
            step.update({"coordinator_heap": coord.heap(), "coordinator_rss_mb": round(rss, 1),
                         "coordinator_rss_mb_per_1000": round((rss - idle_rss) * 1000 / fleet.size, 2),
                         "coordinator_cpu_s_total": round(proc_cpu(coord.pid), 2),
                         "coordinator_admission": stats["admission"], "registry": stats["registry"],
                         "coordinator_gc_cpu_s_total": stats["gc_cpu_s"], "coordinator_gc_collections": stats["gc_collections"]})
            if args.trim:
                step["coordinator_trim"] = trimmed = coord.trim()
                print(f"        RSS {trimmed['rss_mb']} MB, after gc.collect() {trimmed['after_gc_mb']} MB, "
                      f"after malloc_trim(0) {trimmed['after_malloc_trim_mb']} MB", flush=True)
            if args.tracemalloc:
                mem = coord.memory()
                mem["rss_mb"] = round(proc_rss_mb(coord.pid), 1)
                out["memory"].append(mem)
                print(f"        tracemalloc: {mem['grown_mb']} MB grown over {mem['registry']} devices "
                      f"({mem['grown_mb'] * 1024 / max(1, mem['registry']):.1f} KB each); top sites:", flush=True)
                for site in mem["sites"][:15]:
                    print(f"          {site['kb']:>9.1f} KB {site['blocks']:>8} blocks  {site['site']}", flush=True)
            print(f"        event -> {applied}/{fleet.size} applied in {step['event_all_applied_s']} s; "
                  f"coordinator converged in {step['coordinator_converged_s']} s; CPU per device: coordinator "
                  f"{step['coordinator_cpu_ms_per_device_fanout']} ms, simulators {step['simulator_cpu_ms_per_device_fanout']} "
                  f"ms, broker {step['broker_cpu_ms_per_device_fanout']} ms; RSS {rss:.0f} MB "
                  f"({step['coordinator_rss_mb_per_1000']} MB per 1,000 above idle; heap {step['coordinator_heap']}); load {load()}",
                  flush=True)
            out["steps"].append(step)
        # reconnect storm: the broker restarts under the whole fleet
        if args.storm and fleet.size:
            before = coord.stats()
            cpu0, sim0 = proc_cpu(coord.pid), fleet.cpu()
            t0 = time.monotonic()
            broker.restart()
            t_up = time.monotonic()
            db = broker.workdir / "data" / "mosquitto.db"       # what its stop saved: the whole fleet
            db_mb = round(db.stat().st_size / 2**20, 1) if db.exists() else None
            target = before["admitted"] + fleet.size + 1      # every phone and the display
            ok = wait_until(lambda: coord.stats()["admitted"] >= target, args.timeout, 0.25)
            t_admitted = time.monotonic()
            after = coord.stats()
            states = fleet.ask("state", 0)
            admitted_now = sum(s["admitted"] for s in states)
            storm_settle = settle(coord, args.settle)
            version += 1
            (te,) = fleet.ask("event", 1000 + version, only=0)
            applied, last = fleet.wait(1000 + version, args.timeout)
            conv = converged_after(coord, te, fleet.size, args.timeout)
            t_conv = time.monotonic()
            storm = {
                "devices": fleet.size, "broker_restart_s": round(t_up - t0, 2), "broker_db_mb": db_mb,
                "all_readmitted": ok, "readmitted": after["admitted"] - before["admitted"],
                "readmitted_s": round(t_admitted - t0, 2), "devices_admitted_after": admitted_now,
                "by_ticket": after["admission"]["resumed"] - before["admission"]["resumed"],
                "presentations_signed": after["admission"]["signed"] - before["admission"]["signed"],
                "busy": after["admission"]["busy"] - before["admission"]["busy"],
                "peak_inflight": after["admission"]["peak"],
                "event_applied_after": applied, "lost": fleet.size - applied, **storm_settle,
                "readmitted_and_converged_s": round(t_conv - t0, 2),
                "event_all_applied_s": round(last - te, 3) if last is not None and applied >= fleet.size else None,
                "coordinator_converged_s": round(conv["seconds"], 3) if conv else None,
                "coordinator_cpu_ms_per_device": round((proc_cpu(coord.pid) - cpu0) * 1000 / fleet.size, 3),
                "simulator_cpu_ms_per_device": round((fleet.cpu() - sim0) * 1000 / fleet.size, 3),
                "broker_cpu_ms_per_device_since_restart": round(broker_cpu(broker) * 1000 / fleet.size, 3),
                "load": load()}
            out["storm"] = storm
            print(f"storm: broker restart with {fleet.size} devices -> {storm['readmitted']} re-admitted "
                  f"({storm['by_ticket']} by ticket, {storm['presentations_signed']} presentations signed) in "
                  f"{storm['readmitted_s']} s; converged on a new event {storm['readmitted_and_converged_s']} s "
                  f"after the restart; lost {storm['lost']}; load {load()}", flush=True)
    finally:
        if fleet is not None:
            fleet.close()
        coord.stop()
        broker.cleanup()
        tmp.cleanup()
    out["load_at_end"] = load()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="*", default=[1000, 5000, 10000])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=100, help="connects in flight per worker")
    parser.add_argument("--max-admissions", type=int, default=256)
    parser.add_argument("--queue-wait", type=float, default=60.0,
                        help="coordinator: seconds a publish waits for room in its send queue (0: fail at once)")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--no-storm", dest="storm", action="store_false")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="cProfile the coordinator per step: DIR/admission-N.prof and DIR/fanout-N.prof "
                             "(and the last worker: DIR/worker-admission-N.prof, DIR/worker-fanout-N.prof)")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="sample the coordinator and the last worker with py-spy during each admission step and fan-out: "
                             "DIR/admission-N-coordinator.txt, DIR/fanout-N-worker.txt and so on (collapsed stacks)")
    parser.add_argument("--strace", type=Path, default=None, metavar="DIR",
                        help="count the coordinator's and the last worker's system calls (strace -c) during each "
                             "admission step and fan-out, instead of sampling them: DIR/LABEL-NAME.txt")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                        help="trace the coordinator's allocations (FRAMES deep) and break its growth down per step")
    parser.add_argument("--trim", action="store_true",
                        help="after each step's RSS reading: the coordinator's RSS after gc.collect() and malloc_trim(0)")
    parser.add_argument("--gc-freeze", action="store_true", help="the coordinator calls gc.freeze() after start")
    parser.add_argument("--gc-threshold", type=int, default=0, metavar="N",
                        help="the coordinator's first-generation GC threshold (0: Python's default)")
    parser.add_argument("--sim-gc", type=int, default=20000, metavar="N",
                        help="the simulator processes' first-generation GC threshold (default 20000, so their "
                             "collections of 2,500 devices each load the machine less; 0: Python's 700)")
    parser.add_argument("--no-sim-gc-freeze", dest="sim_gc_freeze", action="store_false",
                        help="the simulators do not gc.freeze() their devices after each admission step (by "
                             "default they do: a real device's collections walk one device's objects, not 2,500)")
    parser.add_argument("--sim-nice", type=int, default=10, metavar="N",
                        help="the simulator processes' nice value (default 10: the coordinator and the "
                             "broker are scheduled first, as with a fleet on its own hardware, and the "
                             "simulators take every cycle they leave; 0: all six processes share the cores "
                             "equally, so four simulators take four sixths of them from the coordinator)")
    parser.add_argument("--settle", type=float, default=15.0, metavar="S",
                        help="before each event, wait up to S seconds for the coordinator to go idle "
                             "(under 5 %% of a core for 0.5 s), so the fan-out does not carry the "
                             "admission's tail; the wait and its CPU are reported (0: no wait)")
    parser.add_argument("--json", type=Path, default=None)
    # the coordinator process (started by the benchmark itself)
    parser.add_argument("--coordinator", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--broker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--issuer-seed", help=argparse.SUPPRESS)
    parser.add_argument("--coord-seed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.coordinator:
        coordinator_main(args)
        return
    logging.basicConfig(level=logging.ERROR)
    out = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
