"""Coordinator failover: two ``autoglm coordinator`` processes with ``[ha] enabled`` (lease in
PostgreSQL), N devices in this process; kill -9 of the active, R rounds; per broker tier.

    python3 bench/ha_bench.py [--broker mosquitto|ejabberd|both] [--devices 100] [--rounds 4]
                              [--lease-ttl 3] [--modes ticket,full] [--json out.json]

Broker tiers (``both``, the default: one after the other in one run, the same arguments):

* ``mosquitto``: one loopback Mosquitto; both instances and every device on it;
* ``ejabberd``: two ejabberd nodes joined in a cluster (DID extauth, the %u topic ACL, the
  coordinator DID its admin); instance ``a`` on node 1 and ``b`` on node 2 (each with the other
  node listed second, for broker failover), the devices with both URLs, node 2 first. The first
  kill -9 hits ``a`` (on node 1): the devices' and the display's traffic crosses the cluster to it
  until then, and reaches ``b`` on their own node after; the next round kills ``b``, and so on.

Per round, from the kill -9 (wall clock; the lease timing dominates, so CPU load from other
processes moves these figures little):

* ``promoted_s``: the standby holds the lease and serves (its ``ha.json`` ``since``);
* ``first_config_s``: an event published by the display right after the kill (queued in its outbox,
  re-sent once re-admitted) is applied on the first phone: the first config pushed by the new active;
* ``all_configs_s``: that config applied on every phone;
* ``all_readmitted_s``: every device admitted again by the new active (its new ``boot``);
* ``readmission_s``: the same, counted from the promotion (what the devices' handshakes cost);
* ``by_ticket`` / ``full``: the new active's admissions by resumption ticket and by full handshake
  (its ``autoglm_coord_auth_total`` metrics);
* ``new_active_cpu_s``: CPU seconds (user + system, ``/proc``) the standby process spent from the
  kill until every device was re-admitted: promotion (loading the store) plus the re-admissions.

Rounds alternate ``--modes``: ``ticket`` (the devices keep the tickets the old active handed out,
which the new one honours from the shared store) and ``full`` (the devices' tickets are dropped
before the kill: every device runs the full hello + present handshake, as before tickets were kept
in the store). The medians are given per mode.

The killed instance is restarted (it comes back as the standby) before the next round. Before the
rounds, ``idle_cpu_ms_per_s``: CPU time (user + system, from ``/proc``) each instance spends per
second over ``--idle`` seconds with the devices connected and no events: the standby's lease
polling against the active's renewals, heartbeats and sweeps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from brokers.ejabberd import EjabberdCluster, ejabberd_username  # noqa: E402
from brokers.mosquitto import MosquittoBroker, MosquittoConfig  # noqa: E402
from brokers.postgres import PostgresServer  # noqa: E402
from sdk.coord.coordinator.auth import coordinator_credential, device_credential  # noqa: E402
from sdk.coord.coordinator.ha import read_status  # noqa: E402
from sdk.coord.device import Device  # noqa: E402
from sdk.coord.events import screen_available  # noqa: E402
from sdk.identity import Key  # noqa: E402

RULES = ROOT / "examples" / "rules.toml"


class Instance:
    def __init__(self, name: str, tmp: Path, *, broker: list[str], store: str, key: Key, vc: Path, issuer: Key,
                 ttl: float) -> None:
        from brokers.mosquitto import free_port

        self.port = free_port()
        self.name, self.data = name, tmp / name
        self.data.mkdir(parents=True)
        self.config = self.data / "coordinator.toml"
        self.config.write_text(
            f'rules_file = "{RULES}"\n[coordinator]\nbroker = {json.dumps(broker)}\ndata_dir = "{self.data}"\n'
            f'heartbeat_ttl = 600\nmetrics_port = {self.port}\n[identity]\nkey = "{key.private_key_multibase}"\ncredential = "{vc}"\n'
            f'[[trust]]\nissuer = "{issuer.did}"\ntypes = ["DeviceCredential"]\n[store]\nurl = "{store}"\n'
            f'[ha]\nenabled = true\nlease_ttl = {ttl}\ninstance = "{name}"\n')
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        (self.data / "ha.json").unlink(missing_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-m", "sdk", "coordinator", "-c", str(self.config),
                                      "--log-file", str(self.data / "coordinator.log")], cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def status(self) -> dict[str, Any]:
        return read_status(self.data) or {}

    @property
    def role(self) -> str | None:
        return self.status().get("role") if self.proc is not None and self.proc.poll() is None else None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def auth_counts(port: int) -> dict[str, float]:
    """``autoglm_coord_auth_total`` by result from an instance's metrics endpoint."""
    from urllib.request import urlopen

    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {line.split('"')[1]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith('autoglm_coord_auth_total{result="')}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.005)


class Tier:
    """A broker tier: the URLs each instance and the devices connect to, and the devices' login."""

    def __init__(self, name: str, instance_urls: list[list[str]], device_url: str,
                 cluster: EjabberdCluster | None = None) -> None:
        self.name, self.instance_urls, self.device_url, self.cluster = name, instance_urls, device_url, cluster

    def login(self, key: Key) -> dict[str, Any]:
        return self.cluster.credentials(key) if self.cluster is not None else {}


def mosquitto_tier(mq: MosquittoBroker) -> Tier:
    return Tier("mosquitto", [[mq.url], [mq.url]], mq.url)


def ejabberd_tier(cluster: EjabberdCluster, key: Key) -> Tier:
    """``a`` on node 1, ``b`` on node 2 (the coordinator's ejabberd username in its URLs); the
    devices with both URLs, node 2 first."""
    user = ejabberd_username(key.did)
    urls = [u.replace("mqtt://", f"mqtt://{user}@") for u in cluster.urls]
    return Tier("ejabberd", [urls, urls[::-1]], ",".join(reversed(cluster.urls)), cluster)


async def run(args: argparse.Namespace, tier: Tier, key: Key) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="ha-bench-"))
    pg = PostgresServer().start()
    issuer = Key.generate()
    vc = tmp / "coordinator-vc.json"
    vc.write_text(json.dumps(coordinator_credential(issuer, key.did)))
    store = pg.fresh_url()
    insts = [Instance(n, tmp, broker=urls, store=store, key=key, vc=vc, issuer=issuer, ttl=args.lease_ttl)
             for n, urls in zip(("a", "b"), tier.instance_urls, strict=True)]
    load = [round(x, 2) for x in os.getloadavg()]
    devices: list[Device] = []
    rounds: list[dict[str, Any]] = []
    idle: dict[str, float] = {}
    try:
        insts[0].start()
        await wait(lambda: insts[0].role == "active", 30, "a active")
        insts[1].start()
        await wait(lambda: insts[1].role == "standby", 30, "b standby")
        applied: dict[str, dict[str, float]] = {}      # resolution -> did -> wall time applied

        def recorder(did: str) -> Any:
            def on_config(cfg: Any) -> None:
                res = cfg.state.get("ui.companion.resolution")
                applied.setdefault(res, {}).setdefault(did, time.time())
            return on_config

        sem = asyncio.Semaphore(16)

        async def make(kind: str) -> Device:
            dkey = Key.generate()
            cred = device_credential(issuer, dkey.did, kind=kind, groups=["room:bench"])
            dev = Device(dkey, cred, broker=tier.device_url, coordinator=key.did, heartbeat_ttl=600,
                         auth_timeout=5, on_config=recorder(dkey.did) if kind == "phone" else None,
                         **tier.login(dkey))
            async with sem:
                await dev.connect()
            devices.append(dev)
            return dev

        display = await make("display")
        phones = await asyncio.gather(*(make("phone") for _ in range(args.devices)))
        await display.publish_event(screen_available(640, 480))
        await wait(lambda: len(applied.get("640x480", {})) == len(phones), 60, "warm-up config")
        pids = {i.role: i.proc.pid for i in insts if i.proc is not None}
        before = {role: cpu_seconds(pid) for role, pid in pids.items()}
        await asyncio.sleep(args.idle)
        idle = {str(role): round(1000 * (cpu_seconds(pid) - before[role]) / args.idle, 2)
                for role, pid in pids.items()}
        print(f"[{tier.name}] idle CPU ms per s: {idle}", flush=True)
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        for r in range(args.rounds):
            mode = modes[r % len(modes)]
            if mode == "full":
                for dev in devices:
                    dev._ticket = None           # as before tickets outlived their instance
            active = next(i for i in insts if i.role == "active")
            standby = next(i for i in insts if i is not active)
            res = f"{800 + r}x600"
            assert active.proc is not None and standby.proc is not None
            cpu0 = cpu_seconds(standby.proc.pid)
            t_kill = time.time()
            active.proc.send_signal(signal.SIGKILL)
            active.proc.wait(10)
            await display.publish_event(screen_available(800 + r, 600))
            await wait(lambda s=standby: s.role == "active", 30, "takeover")
            boot = standby.status()["boot"]
            promoted = standby.status()["since"] - t_kill
            await wait(lambda res=res: len(applied.get(res, {})) == len(phones), 60, "configs after failover")
            await wait(lambda b=boot: all(d.admission is not None and d.admission.boot == b for d in devices),
                       60, "re-admitted")
            t_all = time.time()
            cpu = cpu_seconds(standby.proc.pid) - cpu0
            times = sorted(applied[res].values())
            auth = await asyncio.to_thread(auth_counts, standby.port)
            resumed = auth.get("resumed", 0.0)
            rounds.append({"mode": mode, "killed": active.name, "promoted_s": round(promoted, 3),
                           "first_config_s": round(times[0] - t_kill, 3),
                           "all_configs_s": round(times[-1] - t_kill, 3), "all_readmitted_s": round(t_all - t_kill, 3),
                           "readmission_s": round(t_all - t_kill - promoted, 3),
                           "by_ticket": int(resumed), "full": int(auth.get("admitted", 0.0) - resumed),
                           "new_active_cpu_s": round(cpu, 3)})
            print(f"[{tier.name}] round {r + 1} (killed {active.name}): {rounds[-1]}", flush=True)
            active.start()                       # the old active comes back as the standby
            await wait(lambda a=active: a.role == "standby", 30, "old active standby")
    finally:
        for dev in devices:
            await dev.aclose()
        for inst in insts:
            inst.stop()
        pg.cleanup()
    summary = {mode: {k: round(statistics.median(float(r[k]) for r in rounds if r["mode"] == mode), 3)
                      for k in rounds[0] if k not in ("mode", "killed")}
               for mode in dict.fromkeys(str(r["mode"]) for r in rounds)}
    load += [round(x, 2) for x in os.getloadavg()]
    return {"broker": tier.name, "date": time.strftime("%Y-%m-%d", time.gmtime()), "devices": args.devices,
            "rounds": rounds, "median": summary, "idle_cpu_ms_per_s": idle, "lease_ttl": args.lease_ttl,
            "load_average": f"{load[0]}/{load[1]}/{load[2]} at start, {load[3]}/{load[4]}/{load[5]} at end (1/5/15 min)",
            "poll_interval": args.lease_ttl / 5, "host": platform.node(), "cpus": os.cpu_count(),
            "python": platform.python_version()}


async def run_all(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One run per broker tier, in turn (each with its own PostgreSQL and brokers, stopped after)."""
    out = []
    if args.broker in ("mosquitto", "both"):
        mq = MosquittoBroker(MosquittoConfig.open_for_tests())
        mq.start()
        try:
            out.append(await run(args, mosquitto_tier(mq), Key.generate()))
        finally:
            mq.cleanup()
    if args.broker in ("ejabberd", "both"):
        key = Key.generate()                     # the coordinator DID: the cluster's one ACL admin
        cluster = EjabberdCluster(nodes=2, admins=(key.did,))
        await asyncio.to_thread(cluster.start)
        try:
            out.append(await run(args, ejabberd_tier(cluster, key), key))
        finally:
            await asyncio.to_thread(cluster.cleanup)
    return out


def write_runs(path: Path, runs: list[dict[str, Any]]) -> None:
    """Append ``runs`` to the ``runs`` list of ``path`` (created if absent; other keys kept)."""
    doc: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("runs", []).extend(runs)
    path.write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--broker", choices=("mosquitto", "ejabberd", "both"), default="both",
                   help="broker tier(s): one Mosquitto, a two-node ejabberd cluster, or both in turn")
    p.add_argument("--devices", type=int, default=100)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--modes", default="ticket,full", help="round modes in turn: ticket, full")
    p.add_argument("--lease-ttl", type=float, default=3.0)
    p.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measurement")
    p.add_argument("--json", type=Path, help="append the runs to this file's runs list")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)
    runs = asyncio.run(run_all(args))
    for r in runs:
        print(r["broker"], json.dumps(r["median"]))
    if args.json:
        write_runs(args.json, runs)


if __name__ == "__main__":
    main()
