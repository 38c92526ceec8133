"""Highly available coordinator: two ``autoglm coordinator`` processes with ``[ha] enabled`` on one
shared store (PostgreSQL, and a SQLite file for instances on one host), a real broker, real devices.

One instance holds the lease and serves; the other is a hot standby. kill -9 of the active mid-push:
the standby takes over, every device ends on the latest config, no event applied twice, no version
number reused; the old active restarted stays standby; a paused (SIGSTOP) active whose lease was
taken cannot commit after SIGCONT (the fenced store refuses it) and steps down.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sdk.coord.coordinator.auth import coordinator_credential, device_credential
from sdk.coord.coordinator.ha import read_status
from sdk.coord.coordinator.store import open_store
from sdk.coord.device import Device
from sdk.coord.events import screen_available
from sdk.identity import Key
from tests.fixtures.waiting import until

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "examples" / "rules.toml"
LEASE_TTL = 3.0
pytestmark = [pytest.mark.cluster, pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The shared store: a fresh PostgreSQL database, or one SQLite file both instances open."""
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres").fresh_url())
    return f"sqlite:///{tmp_path / 'shared' / 'coordinator.db'}"


@dataclass
class Instance:
    """One ``autoglm coordinator`` process of the HA group (its own data directory and log)."""

    name: str
    config: Path
    data: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def status(self) -> dict[str, Any]:
        return read_status(self.data) or {}

    @property
    def role(self) -> str | None:
        return self.status().get("role") if self.alive else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def events(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def has(self, event: str, **fields: Any) -> bool:
        return any(e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
                   for e in self.events())


@dataclass
class Group:
    """A coordinator identity shared by every instance, the issuer that trusts it, and the devices."""

    tmp: Path
    store_url: str
    key: Key = field(default_factory=Key.generate)
    issuer: Key = field(default_factory=Key.generate)
    credentials: Any = None             # credentials(key) -> transport kwargs (ejabberd's usernames)
    instances: list[Instance] = field(default_factory=list)
    closers: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.vc = self.tmp / "coordinator-vc.json"
        self.vc.write_text(json.dumps(coordinator_credential(self.issuer, self.key.did)))

    def instance(self, name: str, broker: str, *, metrics_port: int = 0) -> Instance:
        data = self.tmp / name
        data.mkdir(parents=True, exist_ok=True)
        config = data / "coordinator.toml"
        config.write_text(
            f'rules_file = "{RULES}"\n'
            f'[coordinator]\nbroker = "{broker}"\ndata_dir = "{data}"\nheartbeat_ttl = 30\n'
            f'sweep_interval = 0.2\nmetrics_port = {metrics_port}\n'
            f'[identity]\nkey = "{self.key.private_key_multibase}"\ncredential = "{self.vc}"\n'
            f'[[trust]]\nissuer = "{self.issuer.did}"\ntypes = ["DeviceCredential"]\n'
            f'[store]\nurl = "{self.store_url}"\n'
            f'[ha]\nenabled = true\nlease_ttl = {LEASE_TTL}\ninstance = "{name}"\n')
        inst = Instance(name, config, data, data / "coordinator.log")
        self.instances.append(inst)
        return inst

    def start(self, inst: Instance) -> Instance:
        inst.log.unlink(missing_ok=True)
        (inst.data / "ha.json").unlink(missing_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        inst.proc = subprocess.Popen(
            [sys.executable, "-m", "sdk", "coordinator", "-c", str(inst.config), "--log-format", "json",
             "--log-file", str(inst.log)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return inst

    async def wait_role(self, inst: Instance, role: str, timeout: float = 20.0) -> dict[str, Any]:
        def check() -> bool:
            if inst.proc is not None and inst.proc.poll() is not None:
                err = inst.proc.stderr.read().decode() if inst.proc.stderr else ""
                raise AssertionError(f"{inst.name} exited ({inst.proc.returncode}): {err[-2000:]}")
            return inst.role == role
        await until(check, timeout, what=f"{inst.name} {role}")
        return inst.status()

    async def active(self, timeout: float = 20.0) -> Instance:
        await until(lambda: any(i.role == "active" for i in self.instances), timeout, what="an active instance")
        return next(i for i in self.instances if i.role == "active")

    def stop(self) -> None:
        for close in self.closers:
            close()
        for inst in self.instances:
            if inst.proc is None or inst.proc.poll() is not None:
                continue
            inst.proc.send_signal(signal.SIGCONT)
            inst.proc.send_signal(signal.SIGTERM)
        for inst in self.instances:
            if inst.proc is None:
                continue
            try:
                inst.proc.wait(15)
            except subprocess.TimeoutExpired:
                inst.proc.kill()
                inst.proc.wait(5)

    async def device(self, stack: AsyncExitStack, kind: str, broker: str, record: list[Any] | None = None) -> Device:
        key = Key.generate()
        cred = device_credential(self.issuer, key.did, kind=kind, groups=["room:ha"])
        extra = self.credentials(key) if self.credentials is not None else {}
        dev = Device(key, cred, broker=broker, coordinator=self.key.did, auth_timeout=3,
                     on_config=record.append if record is not None else None, **extra)
        stack.push_async_callback(dev.aclose)
        await dev.connect()
        return dev

    def counter(self, sql: str) -> Any:
        """``count()``: runs a one-number query on one open connection to the store (cheap to poll)."""
        if self.store_url.startswith("sqlite:"):
            import sqlite3

            db: Any = sqlite3.connect(self.store_url.removeprefix("sqlite://"))
        else:
            import psycopg

            db = psycopg.connect(self.store_url, autocommit=True)
        self.closers.append(db.close)
        return lambda: int(db.execute(sql).fetchone()[0])

    def rows(self) -> dict[str, list[tuple[int, str | None, dict[str, Any]]]]:
        """Every committed version: did -> [(version, event_id, state)], read from the shared store."""
        store = open_store(self.store_url)
        try:
            out: dict[str, list[tuple[int, str | None, dict[str, Any]]]] = {}
            for row in store.load_devices():
                did = row["did"]
                out[did] = [(c.version, c.event_id, dict(c.state)) for c in store.versions_since(did, 0)]
            return out
        finally:
            store.close()


@pytest.fixture
def group(tmp_path: Path, store_url: str) -> Iterator[Group]:
    g = Group(tmp_path, store_url)
    try:
        yield g
    finally:
        g.stop()


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


def _auth_counts(port: int) -> dict[str, float]:
    """``autoglm_coord_auth_total`` by result, scraped from an instance's metrics endpoint."""
    from urllib.request import urlopen

    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith('autoglm_coord_auth_total{result="'):
            label, value = line.split('"')[1], line.rsplit(" ", 1)[1]
            out[label] = float(value)
    return out


def _resolution(configs: list[Any]) -> str | None:
    return configs[-1].state.get("ui.companion.resolution") if configs else None


def _assert_applied_once(group: Group, phones: dict[str, list[Any]], events: int) -> None:
    """Store rows: one version per event per phone (versions 1..n, each event id once); what each
    phone applied matches the store's version of that number (no number reused)."""
    rows = group.rows()
    for did, got in phones.items():
        stored = rows[did]
        assert [v for v, _, _ in stored] == list(range(1, events + 1)), stored
        ids = [e for _, e, _ in stored]
        assert len(set(ids)) == len(ids) == events, ids
        versions = [c.version for c in got]
        assert versions == sorted(set(versions)), versions
        by_version = {v: s for v, _, s in stored}
        for c in got:
            assert dict(c.state) == by_version[c.version]


async def test_one_instance_is_active_the_other_standby_and_the_active_serves(
        group: Group, mosquitto_broker: Any, stack: AsyncExitStack) -> None:
    from brokers.mosquitto import free_port

    port = free_port()
    a = group.start(group.instance("a", mosquitto_broker.url, metrics_port=port))
    await group.wait_role(a, "active")
    b = group.start(group.instance("b", mosquitto_broker.url))
    status = await group.wait_role(b, "standby")
    await until(lambda: b.status().get("lease", {}).get("holder") == a.status()["holder"], 10,
                what="the standby sees the active's lease")
    assert a.role == "active" and status["token"] is None
    got: list[Any] = []
    display = await group.device(stack, "display", mosquitto_broker.url)
    await group.device(stack, "phone", mosquitto_broker.url, got)
    await display.publish_event(screen_available(800, 600))
    await until(lambda: _resolution(got) == "800x600", 15, what="A -> coordinator -> B")
    # the CLI and the metrics say who is who
    out = {}
    for inst in (a, b):
        proc = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "sdk", "coordinator", "status",
                                                        "-c", str(inst.config), "--json"],
                                       cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        out[inst.name] = json.loads(proc.stdout)
    assert out["a"]["role"] == "active" and out["b"]["role"] == "standby"
    assert out["a"]["lease"]["holder"] == out["b"]["lease"]["holder"] == a.status()["holder"]
    assert out["a"]["lease"]["token"] == a.status()["token"]
    from urllib.request import urlopen

    text = await asyncio.to_thread(lambda: urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode())
    assert 'autoglm_coordinator_role{role="active"} 1.0' in text
    assert f"autoglm_coordinator_lease_token {float(a.status()['token'])}" in text
    assert "autoglm_coordinator_failovers_total 0.0" in text
    assert "autoglm_coord_configs_total" in text          # the serving coordinator's own metrics
    # a graceful stop releases the lease (it does not wait to expire) and b takes over
    assert a.proc is not None
    a.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(a.proc.wait, 15) == 0
    assert a.has("ha_demoted", reason="stopped")
    store = open_store(group.store_url)
    try:
        lease = store.lease()
        assert lease is not None and lease.holder in (None, b.status().get("holder"))
        assert lease.holder is not None or (lease.expires is not None and lease.expires <= time.time())
    finally:
        store.close()
    await group.wait_role(b, "active")
    await display.publish_event(screen_available(1024, 768))
    await until(lambda: _resolution(got) == "1024x768", 15, what="served by b")


async def test_kill_9_of_the_active_mid_push_the_standby_completes_it_and_the_old_one_stays_standby(
        group: Group, mosquitto_broker: Any, stack: AsyncExitStack) -> None:
    from brokers.mosquitto import free_port

    url = mosquitto_broker.url
    a = group.start(group.instance("a", url))
    await group.wait_role(a, "active")
    port = free_port()
    b = group.start(group.instance("b", url, metrics_port=port))
    await group.wait_role(b, "standby")
    display = await group.device(stack, "display", url)
    phones: dict[str, list[Any]] = {}
    for _ in range(30):
        got: list[Any] = []
        dev = await group.device(stack, "phone", url, got)
        phones[dev.did] = got
    await display.publish_event(screen_available(800, 600))
    await until(lambda: all(_resolution(g) == "800x600" for g in phones.values()), 20, what="v1 everywhere")

    # kill -9 of the active as soon as the second event's commit is in the store (mid-push)
    committed = group.counter("SELECT COUNT(*) FROM desired WHERE version = 2")
    await display.publish_event(screen_available(1024, 768))
    deadline = time.monotonic() + 15
    while committed() < len(phones):            # polled every millisecond: the kill lands mid-push
        assert time.monotonic() < deadline, "v2 not committed"
        await asyncio.sleep(0.001)
    assert a.proc is not None
    a.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(a.proc.wait, 10)
    took = await group.wait_role(b, "active", timeout=15)
    assert took["token"] > a.status()["token"]
    await display.publish_event(screen_available(1280, 720))
    await until(lambda: all(_resolution(g) == "1280x720" for g in phones.values()), 30,
                what="every phone on the latest config after the failover")
    _assert_applied_once(group, phones, events=3)
    assert b.has("ha_promoted")
    # the devices re-admitted with b by the tickets a handed out (kept in the shared store): no
    # hello, no presentation signed by b; one whose resumed request timed out while b was starting
    # falls back to a full handshake (none is refused wrong_challenge)
    auth = await asyncio.to_thread(_auth_counts, port)
    assert auth.get("resumed", 0) >= 0.9 * (len(phones) + 1), auth
    assert "wrong_challenge" not in auth, auth

    # the old active comes back: it stays standby while b holds the lease
    group.start(a)
    await group.wait_role(a, "standby")
    started = time.time()
    await until(lambda: a.status().get("updated", 0) > started + 2 * LEASE_TTL, 20,
                what="the restarted instance polled past two lease periods")
    assert a.role == "standby" and b.role == "active"
    assert a.status()["lease"]["holder"] == b.status()["holder"]
    assert b.status()["token"] == took["token"]


async def test_a_paused_active_whose_lease_was_taken_cannot_commit_after_it_resumes(
        group: Group, mosquitto_broker: Any, stack: AsyncExitStack) -> None:
    url = mosquitto_broker.url
    a = group.start(group.instance("a", url))
    await group.wait_role(a, "active")
    b = group.start(group.instance("b", url))
    await group.wait_role(b, "standby")
    display = await group.device(stack, "display", url)
    phones: dict[str, list[Any]] = {}
    for _ in range(3):
        got: list[Any] = []
        dev = await group.device(stack, "phone", url, got)
        phones[dev.did] = got
    await display.publish_event(screen_available(800, 600))
    await until(lambda: all(_resolution(g) == "800x600" for g in phones.values()), 20, what="v1")
    assert a.proc is not None
    a_token = a.status()["token"]
    a.proc.send_signal(signal.SIGSTOP)             # split brain: a still believes it is active
    try:
        took = await group.wait_role(b, "active", timeout=15)
        assert took["token"] == a_token + 1
        # an event while a is paused reaches both subscriptions; b commits it
        await display.publish_event(screen_available(1024, 768))
        await until(lambda: all(_resolution(g) == "1024x768" for g in phones.values()), 30, what="v2 via b")
    finally:
        a.proc.send_signal(signal.SIGCONT)
    await until(lambda: a.has("ha_demoted", reason="lease_lost"), 15, what="a steps down")
    await group.wait_role(a, "standby")
    # it noticed by the refused write (LeaseLost) or the late renewal, whichever came first
    assert a.has("ha_lease_lost") or a.has("ha_renew_timeout")
    await display.publish_event(screen_available(1280, 720))
    await until(lambda: all(_resolution(g) == "1280x720" for g in phones.values()), 30, what="v3 via b")
    _assert_applied_once(group, phones, events=3)
    store = open_store(group.store_url)
    try:
        lease = store.lease()
    finally:
        store.close()
    assert lease is not None and lease.holder == b.status()["holder"] and lease.token == took["token"]
    assert b.role == "active" and a.role == "standby"


async def test_a_write_refused_by_the_fence_demotes_the_active_at_once(tmp_path: Path, embedded_broker: Any,
                                                                       stack: AsyncExitStack) -> None:
    """In one process: another holder takes the lease (its clock past the expiry) while this active
    still thinks it holds it; the next event's commit is refused (LeaseLost, nothing written) and the
    active steps down at once, long before its next renewal (lease_ttl 60 s: renewal every 20 s)."""
    from sdk.coord.coordinator import Coordinator, load_rules
    from sdk.coord.coordinator.errors import LeaseLost
    from sdk.coord.coordinator.ha import HACoordinator
    from sdk.identity import TrustPolicy

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    key, issuer = Key.generate(), Key.generate()

    def build() -> Coordinator:
        return Coordinator(key, broker=embedded_broker.url, data_dir=tmp_path / "a", trust=TrustPolicy({}),
                           issuer=issuer, rules=load_rules(RULES))

    ha = HACoordinator(build, store_url=url, data_dir=tmp_path / "a", instance="a", lease_ttl=60)
    stack.push_async_callback(ha.stop)
    seen: list[tuple[str, dict[str, Any]]] = []
    ha.add_listener(lambda what, info: seen.append((what, info)))
    await ha.start()
    await ha.wait_role("active", 10)
    assert ha.token is not None and ha.coordinator is not None
    token = ha.token
    devices = []
    for kind in ("display", "phone"):
        dkey = Key.generate()
        cred = ha.coordinator.issue_device_credential(dkey.did, kind=kind, groups=["room:ha"])
        got: list[Any] = []
        dev = Device(dkey, cred, broker=embedded_broker.url, coordinator=key.did, on_config=got.append)
        stack.push_async_callback(dev.aclose)
        await dev.connect()
        devices.append((dev, got))
    (display, _), (phone, got) = devices
    await display.publish_event(screen_available(800, 600))
    await until(lambda: _resolution(got) == "800x600", 10, what="v1")

    other = open_store(url)
    stack.callback(other.close)
    assert other.acquire_lease("b/1", 60, now=time.time() + 120) == token + 1
    other.fence(token + 1, holder="b/1")
    with pytest.raises(LeaseLost):                  # the old token is refused by any fenced store
        fenced = open_store(url)
        try:
            fenced.fence(token, holder=ha.holder)
            fenced.set_meta("probe", "x")
        finally:
            fenced.close()
    await display.publish_event(screen_available(1024, 768))
    await until(lambda: ("demoted", {"reason": "lease_lost", "token": token}) in seen, 10,
                what="the active steps down on the refused commit")
    assert ha.role == "standby" and ha.coordinator is None
    assert other.latest_version(phone.did) == 1 and other.get_meta("probe") is None
    lease = other.lease()
    assert lease is not None and lease.holder == "b/1"


async def test_instances_on_different_ejabberd_nodes_fail_over_with_the_devices_on_node_2(
        ejabberd_cluster: Any, postgres: Any, tmp_path: Path, stack: AsyncExitStack) -> None:
    """Instance a on node 1 (node 2 listed for broker failover), b on node 2, the devices on node 2;
    the lease in PostgreSQL. A -> coordinator -> B through a, kill -9 of a, b takes over and serves."""
    from brokers.ejabberd import credentials, ejabberd_username
    from tests.fixtures.brokers import CLUSTER_ADMIN

    c = ejabberd_cluster
    group = Group(tmp_path, postgres.fresh_url(), key=CLUSTER_ADMIN, credentials=credentials)
    stack.callback(group.stop)
    user = ejabberd_username(CLUSTER_ADMIN.did)

    def urls(*nodes: int) -> str:      # the coordinator's ejabberd username travels in the URL
        return '", "'.join(c.urls[n].replace("mqtt://", f"mqtt://{user}@") for n in nodes)

    a = group.instance("a", "x")
    a.config.write_text(a.config.read_text().replace('broker = "x"', f'broker = ["{urls(0, 1)}"]'))
    b = group.instance("b", "x")
    b.config.write_text(b.config.read_text().replace('broker = "x"', f'broker = ["{urls(1, 0)}"]'))
    group.start(a)
    await group.wait_role(a, "active", timeout=30)
    group.start(b)
    await group.wait_role(b, "standby", timeout=30)
    display = await group.device(stack, "display", c.urls[1])
    phones: dict[str, list[Any]] = {}
    for _ in range(3):
        got: list[Any] = []
        dev = await group.device(stack, "phone", c.urls[1], got)
        phones[dev.did] = got
    await display.publish_event(screen_available(800, 600))
    await until(lambda: all(_resolution(g) == "800x600" for g in phones.values()), 20, what="across nodes")
    assert a.proc is not None
    a.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(a.proc.wait, 10)
    await group.wait_role(b, "active", timeout=15)
    await display.publish_event(screen_available(1024, 768))
    await until(lambda: all(_resolution(g) == "1024x768" for g in phones.values()), 30,
                what="every phone on the latest config from the instance on node 2")
    _assert_applied_once(group, phones, events=2)


@pytest.mark.parametrize(("ha", "store", "broker", "needle"), [
    ("enabled = true", "", "mqtt://127.0.0.1:1883", "needs a [store] url"),
    ("enabled = true", 'url = "postgresql://x@h/db"', "embedded", "external broker"),
    ("enabled = 1", 'url = "postgresql://x@h/db"', "mqtt://127.0.0.1:1883", "true or false"),
    ("enabled = true\nlease_ttl = 0.1", 'url = "postgresql://x@h/db"', "mqtt://127.0.0.1:1883", "lease_ttl"),
    ('enabled = true\ninstance = "a b"', 'url = "postgresql://x@h/db"', "mqtt://127.0.0.1:1883", "instance"),
    ("enabled = true\nttl = 3", 'url = "postgresql://x@h/db"', "mqtt://127.0.0.1:1883", "unknown key"),
])
def test_a_bad_ha_section_is_refused_with_a_typed_error(ha: str, store: str, broker: str, needle: str) -> None:
    from sdk.coord.coordinator.config import parse_config
    from sdk.coord.coordinator.errors import ConfigFileError

    text = f'[coordinator]\nbroker = "{broker}"\n[store]\n{store}\n[ha]\n{ha}\n'
    with pytest.raises(ConfigFileError) as exc:
        parse_config(tomllib.loads(text))
    assert exc.value.reason == "invalid_config_file" and needle in str(exc.value)


def test_an_ha_section_parses_with_defaults() -> None:
    from sdk.coord.coordinator.config import parse_config

    cfg = parse_config(tomllib.loads('[coordinator]\nbroker = ["mqtt://a:1883", "mqtt://b:1883"]\n'
                                     '[store]\nurl = "postgresql://x@h/db"\n[ha]\nenabled = true\n'))
    assert cfg.ha.enabled and cfg.ha.lease_ttl == LEASE_TTL and cfg.ha.instance is None
    assert cfg.store_url == "postgresql://x@h/db" and not parse_config({}).ha.enabled


async def test_after_a_failover_devices_re_admit_by_ticket_and_ignore_the_old_instances_offline_note(
        tmp_path: Path, embedded_broker: Any, stack: AsyncExitStack) -> None:
    """In one process, two instances on a shared SQLite file. The active's connection drops without
    a DISCONNECT and it stops renewing (as kill -9 would: the broker publishes its will); the
    standby takes over. The device re-admits by the ticket the old active handed out (its digest is
    in the shared store: one round trip, no presentation signed by the new active, no
    wrong_challenge refusal), and a late offline note of the old boot leaves it admitted."""
    from sdk.coord.coordinator import Coordinator, load_rules
    from sdk.coord.coordinator.ha import HACoordinator
    from sdk.coord.device.state import DeviceState
    from sdk.coord.protocol import PRESENCE, coordinator_presence, token
    from sdk.identity import TrustPolicy
    from sdk.messaging import SecureClient

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    key, issuer = Key.generate(), Key.generate()

    def runner(name: str) -> HACoordinator:
        def build() -> Coordinator:
            return Coordinator(key, broker=embedded_broker.url, data_dir=tmp_path / name, trust=TrustPolicy({}),
                               issuer=issuer, rules=load_rules(RULES))
        ha = HACoordinator(build, store_url=url, data_dir=tmp_path / name, instance=name, lease_ttl=1.0)
        stack.push_async_callback(ha.stop)
        return ha

    a, b = runner("a"), runner("b")
    await a.start()
    await a.wait_role("active", 10)
    await b.start()
    await b.wait_role("standby", 10)
    assert a.coordinator is not None
    old_boot = a.coordinator.boot
    a_deployment = a.coordinator.deployment
    dkey = Key.generate()
    cred = a.coordinator.issue_device_credential(dkey.did, kind="phone", groups=["room:ha"])
    dev = Device(dkey, cred, broker=embedded_broker.url, coordinator=key.did)
    stack.push_async_callback(dev.aclose)
    await dev.connect()
    assert dev.admission is not None and dev.admission.boot == old_boot

    assert a._task is not None                     # the crash: no renewal, no DISCONNECT
    a._task.cancel()
    await a.coordinator.client.transport.aclose()  # the embedded broker sees the socket drop
    await b.wait_role("active", 10)
    assert b.coordinator is not None
    new_boot = b.coordinator.boot
    await until(lambda: dev.admission is not None and dev.admission.boot == new_boot, 10, what="re-admitted")
    auth = {s.labels["result"]: s.value for m in b.coordinator.metrics.auth.collect() for s in m.samples
            if s.name.endswith("_total")}
    assert auth.get("admitted") == 1 and "wrong_challenge" not in auth, auth
    assert auth.get("resumed") == 1 and b.coordinator.challenges.restored_used == 1, auth
    assert b.coordinator.admission.signed == 0
    assert b.coordinator.deployment == a_deployment

    async with SecureClient(embedded_broker.url, key) as late:   # the old instance's offline note, late
        handled = dev.client.stats.handled
        await late.publish(coordinator_presence(token(key.did)), {"state": "offline", "boot": old_boot},
                           type=PRESENCE, qos=1)
        await until(lambda: dev.client.stats.handled > handled, 10, what="the note handled")
    assert dev.state is DeviceState.ADMITTED


async def test_an_instance_that_cannot_start_releases_the_lease_and_tries_again(
        tmp_path: Path, stack: AsyncExitStack) -> None:
    """Its broker refuses connections: each promotion fails (a typed ConnectFailed, logged), the lease
    is released at once for another instance, and the loop tries again after one lease period."""
    from brokers.mosquitto import free_port
    from sdk.coord.coordinator import Coordinator
    from sdk.coord.coordinator.ha import HACoordinator
    from sdk.identity import TrustPolicy

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    dead = f"mqtt://127.0.0.1:{free_port()}"

    def build() -> Coordinator:
        return Coordinator(Key.generate(), broker=dead, data_dir=tmp_path / "a", trust=TrustPolicy({}),
                           issuer=Key.generate(), connect_timeout=0.5)

    ha = HACoordinator(build, store_url=url, data_dir=tmp_path / "a", instance="a", lease_ttl=1.0)
    stack.push_async_callback(ha.stop)
    await ha.start()
    store = open_store(url)
    stack.callback(store.close)

    def released_twice() -> bool:
        lease = store.lease()
        return lease is not None and lease.token >= 2 and lease.holder is None
    await until(released_twice, 15, what="two failed promotions, each lease released")
    assert ha.role == "standby" and ha.promotions == 0 and ha.coordinator is None


@pytest.mark.postgres
def test_an_active_paused_inside_a_transaction_does_not_block_the_takeover(postgres: Any) -> None:
    """The active holds the lease row locked by an open write transaction when it stops (SIGSTOP,
    a stall); once its lease expired the standby still takes it at once: the server ends a
    session idle in a transaction after 1 s, releasing the lock (else the standby's FOR UPDATE
    would wait for it as long as the pause lasts)."""
    url = postgres.fresh_url()
    active, standby = open_store(url), open_store(url)
    try:
        token = active.acquire_lease("a/1", 1.0)
        assert token is not None
        active.fence(token, holder="a/1")
        active._db.execute("BEGIN")             # the first statement of a fenced write, then nothing
        active._check_fence(active._db)
        time.sleep(1.2)                          # the pause: the lease expires, the session idles
        assert standby.acquire_lease("b/1", 3.0) == token + 1   # not a lock_timeout StoreError after 10 s
        from sdk.coord.coordinator.errors import StoreError

        with pytest.raises(StoreError):          # its transaction is gone: nothing it writes lands
            active.set_meta("late", "x")
        assert standby.get_meta("late") is None
    finally:
        active.close()
        standby.close()
