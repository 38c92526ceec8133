"""Run a real ejabberd (23.x, Debian's package) MQTT cluster on 127.0.0.1 for tests and benchmarks.

``EjabberdCluster(nodes=3)`` writes one ``ejabberd.yml`` / ``ejabberdctl.cfg`` per node into a
private directory owned by the ``ejabberd`` user (ejabberdctl switches to it), starts each node
(``ejabberdctl foreground``, distinct Erlang node names, an MQTT listener on a free port), joins
nodes 2.. to node 1 (``join_cluster``) and tears everything down again (``stop()``: every node,
its extauth programs, and epmd if the cluster started it).

Admission: ``auth_method: [external]`` with the relay of :mod:`brokers.ejabberd_auth` as
``extauth_program`` and one :class:`~brokers.ejabberd_auth.AuthServer` for all nodes (DID CONNECT
proofs; one replay guard for the cluster). ``auth_use_cache: false``, so every CONNECT is checked
(a cached password would let a proof be replayed). Clients log in with
:func:`credentials` (username = the lowercased method-specific id of their ``did:key``).

Topic ACL: ``mod_mqtt``'s ``access_publish`` / ``access_subscribe`` with ``%u`` (a topic level
that nodepreps to the username), the same rules as ``brokers.did_auth.own_topics_acl`` and the
secure Mosquitto: see :func:`topic_acl`. ``admins`` (the coordinator) may do anything.

Retained messages: ``retained="mnesia"`` (ejabberd's default) keeps them per node;
``retained="sql"`` keeps ``mod_mqtt``'s data in a PostgreSQL cluster the runner starts
(``initdb``/``pg_ctl`` on a free port, as the ``ejabberd`` user), shared by every node.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from brokers.ejabberd_auth import AuthServer, ProofVerifier, ejabberd_username
from brokers.mosquitto import BrokerStartError, free_port, wait_for_port
from sdk.identity import Key
from sdk.messaging.broker_auth import did_password
from sdk.messaging.topics import ROOT

log = logging.getLogger(__name__)

EJABBERDCTL = "/usr/sbin/ejabberdctl"
PG_BIN = "/usr/lib/postgresql/15/bin"
USER = "ejabberd"
HOST = "localhost"
RELAY_PYTHON = "/usr/bin/python3"  # the system Python: the ejabberd user can run it
Retained = Literal["mnesia", "sql"]


def find_ejabberd() -> str | None:
    """Path of ejabberdctl, or None if ejabberd is not installed (or cannot run as its user)."""
    found = shutil.which("ejabberdctl") or (EJABBERDCTL if os.access(EJABBERDCTL, os.X_OK) else None)
    if found is None or os.geteuid() != 0:
        return None  # ejabberdctl runs nodes only as root (switching to ejabberd) or as ejabberd
    try:
        pwd.getpwnam(USER)
    except KeyError:
        return None
    return found


def find_postgres() -> str | None:
    """Directory holding initdb/pg_ctl, or None."""
    return PG_BIN if os.access(os.path.join(PG_BIN, "pg_ctl"), os.X_OK) else None


def credentials(key: Key) -> dict[str, Any]:
    """``username``/``password`` keyword arguments for MqttTransport, Device or Coordinator."""
    return {"username": ejabberd_username(key.did), "password": did_password(key)}


def topic_acl(admins: Sequence[str] = ()) -> dict[str, Any]:
    """``acl``, ``access_rules`` and the ``mod_mqtt`` access options of the own-topics policy."""
    everyone, admin = "mqtt_everyone", "mqtt_admin"
    publish = {f"{ROOT}/dev/%u/presence": everyone, f"{ROOT}/dev/%u/events": everyone,
               f"{ROOT}/inf/ads/%u": everyone, f"{ROOT}/status/%u": everyone,
               f"{ROOT}/dev/+/cmd": everyone, f"{ROOT}/inf/req/+": everyone,
               f"{ROOT}/reply/+": everyone, "#": admin}
    subscribe = {f"{ROOT}/dev/%u/#": everyone, f"{ROOT}/inf/req/%u": everyone, f"{ROOT}/reply/%u": everyone,
                 f"{ROOT}/dev/+/presence": everyone, f"{ROOT}/dev/+/events": everyone,
                 f"{ROOT}/dev/+/config": everyone, f"{ROOT}/inf/ads/+": everyone,
                 f"{ROOT}/status/+": everyone, f"{ROOT}/status/#": everyone, "#": admin}
    users = [f"{ejabberd_username(did)}@{HOST}" for did in admins] or [f"nobody@{HOST}"]
    return {
        "acl": {"mqtt_admins": {"user": users}},
        "access_rules": {everyone: {"allow": "all"}, admin: {"allow": "mqtt_admins"}},
        "access_publish": publish,
        "access_subscribe": subscribe,
    }


def _listens(pid: int | None, port: int) -> bool:
    """Whether process ``pid`` holds the listening TCP socket on ``port`` (Linux /proc)."""
    if pid is None:
        return False
    inodes = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    if not inodes:
        return False
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return True
    return False


def _raise_nofile() -> None:
    """One file descriptor per MQTT connection: lift the soft limit (often 1024) to the hard one."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _chown(path: Path) -> None:
    entry = pwd.getpwnam(USER)
    os.chown(path, entry.pw_uid, entry.pw_gid)


def _as_user(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["su", "-s", "/bin/sh", USER, "-c", " ".join(f"'{a}'" for a in args)],
                          capture_output=True, text=True, **kw)


@dataclass
class EjabberdNode:
    """One ejabberd node of the cluster."""

    index: int
    name: str
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def beam_pid(self) -> int | None:
        """OS pid of the node's Erlang VM (from its pid file)."""
        with contextlib.suppress(OSError, ValueError):
            return int((self.dir / "ejabberd.pid").read_text().strip())
        return None

    def ctl_args(self, *command: str) -> list[str]:
        return [EJABBERDCTL, "-n", self.name, "-s", str(self.dir / "spool"), "-l", str(self.dir / "logs"),
                "-f", str(self.dir / "ejabberd.yml"), "-c", str(self.dir / "ejabberdctl.cfg"),
                "-d", str(self.dir), *command]


@dataclass
class _Postgres:
    dir: Path
    port: int
    proc_started: bool = False

    def start(self) -> None:
        data = self.dir / "pgdata"
        self.dir.mkdir(exist_ok=True)
        _chown(self.dir)
        init = _as_user([f"{PG_BIN}/initdb", "-D", str(data), "-A", "trust", "-U", "ejabberd", "-E", "UTF8"])
        if init.returncode:
            raise BrokerStartError(f"initdb failed: {init.stderr[-2000:]}")
        opts = f"-k {self.dir} -h 127.0.0.1 -p {self.port} -c fsync=off -c synchronous_commit=off"
        ctl = _as_user([f"{PG_BIN}/pg_ctl", "-D", str(data), "-l", str(self.dir / "pg.log"), "-w",
                        "-o", opts, "start"])
        if ctl.returncode:
            raise BrokerStartError(f"pg_ctl start failed: {ctl.stdout[-1000:]} {ctl.stderr[-1000:]}")
        self.proc_started = True
        create = _as_user([f"{PG_BIN}/psql", "-h", "127.0.0.1",
                           "-p", str(self.port), "-U", "ejabberd", "-d", "postgres",
                           "-c", "CREATE DATABASE ejabberd"])
        if create.returncode:
            raise BrokerStartError(f"CREATE DATABASE failed: {create.stderr[-1000:]}")
        schema = self._schema()
        load = _as_user([f"{PG_BIN}/psql", "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "ejabberd",
                         "-d", "ejabberd", "-f", str(schema)])
        if load.returncode:
            raise BrokerStartError(f"loading the mod_mqtt schema failed: {load.stderr[-1000:]}")

    def _schema(self) -> Path:
        path = self.dir / "mqtt.sql"
        path.write_text(_MQTT_SCHEMA)
        _chown(path)
        return path

    def stop(self) -> None:
        if self.proc_started:
            _as_user([f"{PG_BIN}/pg_ctl", "-D", str(self.dir / "pgdata"), "-m", "immediate", "stop"])
            self.proc_started = False


#: mod_mqtt's table (ejabberd's sql/pg.sql, the MQTT part; the default single-host schema)
_MQTT_SCHEMA = """
CREATE TABLE mqtt_pub (
    username text NOT NULL,
    resource text NOT NULL,
    topic text NOT NULL,
    qos smallint NOT NULL,
    payload bytea NOT NULL,
    payload_format smallint NOT NULL,
    content_type text NOT NULL,
    response_topic text NOT NULL,
    correlation_data bytea NOT NULL,
    user_properties bytea NOT NULL,
    expiry bigint NOT NULL
);
CREATE UNIQUE INDEX i_mqtt_topic ON mqtt_pub (topic);
"""


@dataclass
class EjabberdCluster:
    """A cluster of ``nodes`` ejabberd nodes on 127.0.0.1 (see the module docstring)."""

    nodes: int = 2
    admins: Sequence[str] = ()
    retained: Retained = "mnesia"
    window: float = 60.0
    acl: bool = True
    extauth_pool_size: int = 2
    members: list[EjabberdNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.nodes <= 5:
            raise ValueError("nodes must be 1..5")
        self.verifier = ProofVerifier(window=self.window)
        self.dir = Path(tempfile.mkdtemp(prefix="autoglm-ejabberd-"))
        os.chmod(self.dir, 0o755)
        _chown(self.dir)
        self.auth = AuthServer(str(self.dir / "auth.sock"), self.verifier)
        self._postgres: _Postgres | None = None
        self._started_epmd = False
        tag = secrets.token_hex(3)
        for i in range(self.nodes):
            node_dir = self.dir / f"node{i + 1}"
            self.members.append(EjabberdNode(i, f"agw{tag}n{i + 1}@localhost", free_port(), node_dir))

    # ------------------------------------------------------------------ public API

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.members]

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated (the form ``broker=`` takes for failover)."""
        return ",".join(self.urls)

    @staticmethod
    def credentials(key: Key) -> dict[str, Any]:
        return credentials(key)

    def start(self) -> None:
        if find_ejabberd() is None:
            raise BrokerStartError("ejabberd is not installed (apt-get install ejabberd) or not runnable")
        self._started_epmd = not self._epmd_running()
        try:
            self.auth.start()
            if self.retained == "sql":
                if find_postgres() is None:
                    raise BrokerStartError(f"PostgreSQL binaries not found in {PG_BIN}")
                self._postgres = _Postgres(self.dir / "pg", free_port())
                self._postgres.start()
            for node in self.members:
                for attempt in range(3):
                    self._prepare(node)
                    try:
                        self._launch(node)
                        break
                    except BrokerStartError as exc:
                        if "address already in use" not in str(exc) or attempt == 2:
                            raise
                        log.info("port %d of %s was taken meanwhile; trying another", node.port, node.name)
                        self._kill_group(node)
                        node.port = free_port()
            for node in self.members[1:]:
                self.join(node)
        except BaseException:
            self.stop()
            raise

    def join(self, node: EjabberdNode) -> None:
        """``join_cluster`` ``node`` to node 1 and wait until it serves MQTT again."""
        first = self.members[0]
        res = _as_user(node.ctl_args("join_cluster", first.name), timeout=60)
        if res.returncode:
            raise BrokerStartError(f"join_cluster {node.name} failed: {res.stdout[-1000:]} {res.stderr[-1000:]}")
        if not wait_for_port("127.0.0.1", node.port, 30.0):
            raise BrokerStartError(f"{node.name} did not come back after join_cluster")

    def running_nodes(self) -> list[str]:
        """The cluster's running nodes, as node 1 (or the first live node) sees them."""
        for node in self.members:
            if node.running:
                res = _as_user(node.ctl_args("list_cluster"), timeout=30)
                return [line.strip().strip("'") for line in res.stdout.split() if "@" in line]
        return []

    def kill(self, index: int) -> None:
        """kill -9 the Erlang VM of node ``index`` (0-based), as a crash would."""
        node = self.members[index]
        pid = node.beam_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if node.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(10)
            self._kill_group(node)

    def restart(self, index: int) -> None:
        """Start a stopped or killed node again (it rejoins the cluster from its spool)."""
        node = self.members[index]
        if node.running:
            return
        self._launch(node)

    def stop(self) -> None:
        """Kill every node, stop the verifier and PostgreSQL; leave nothing running."""
        for node in self.members:  # a throwaway cluster: no graceful stop (it takes seconds a node)
            if node.proc is not None:
                self.kill(node.index)
                node.proc = None
        if self._postgres is not None:
            self._postgres.stop()
        self.auth.stop()
        if self._started_epmd:
            subprocess.run(["epmd", "-kill"], capture_output=True, check=False)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EjabberdCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _epmd_running() -> bool:
        res = subprocess.run(["epmd", "-names"], capture_output=True, text=True, check=False)
        return res.returncode == 0

    def _config(self, node: EjabberdNode) -> dict[str, Any]:
        relay = Path(__file__).with_name("ejabberd_auth.py")
        mqtt: dict[str, Any] = {"db_type": self.retained, "max_queue": 100_000, "session_expiry": 0}
        cfg: dict[str, Any] = {
            "hosts": [HOST],
            "loglevel": "warning",
            "log_rotate_count": 0,
            "auth_method": ["external"],
            "extauth_program": f"{RELAY_PYTHON} {relay} relay {self.auth.path}",
            "extauth_pool_size": self.extauth_pool_size,
            "auth_use_cache": False,
            "shaper": {"normal": {"rate": 100_000_000, "burst_size": 10_000_000}},
            "listen": [{"port": node.port, "ip": "127.0.0.1", "module": "mod_mqtt", "backlog": 4096,
                        "max_payload_size": 1024 * 1024}],
            "modules": {"mod_mqtt": mqtt},
        }
        if self.acl:
            rules = topic_acl(self.admins)
            cfg["acl"] = rules["acl"]
            cfg["access_rules"] = rules["access_rules"]
            mqtt["access_publish"] = rules["access_publish"]
            mqtt["access_subscribe"] = rules["access_subscribe"]
        if self._postgres is not None:
            cfg.update({"sql_type": "pgsql", "sql_server": "127.0.0.1", "sql_port": self._postgres.port,
                        "sql_database": "ejabberd", "sql_username": "ejabberd", "sql_password": "",
                        "sql_pool_size": 4})
        return cfg

    def _prepare(self, node: EjabberdNode) -> None:
        for sub in ("", "spool", "logs"):
            path = node.dir / sub
            path.mkdir(parents=True, exist_ok=True)
            _chown(path)
        # ejabberd.yml is YAML; JSON is YAML, and quotes every topic filter ('#', '%u') safely
        (node.dir / "ejabberd.yml").write_text(json.dumps(self._config(node), indent=1))
        (node.dir / "ejabberdctl.cfg").write_text(
            f'ERLANG_NODE={node.name}\nEJABBERD_PID_PATH={node.dir / "ejabberd.pid"}\n'
            'INET_DIST_INTERFACE=127.0.0.1\nERL_EPMD_ADDRESS=127.0.0.1\nPOLL=true\n'
            'ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\n')
        if os.path.exists("/etc/ejabberd/inetrc"):
            shutil.copy("/etc/ejabberd/inetrc", node.dir / "inetrc")
        for name in ("ejabberd.yml", "ejabberdctl.cfg", "inetrc"):
            if (node.dir / name).exists():
                _chown(node.dir / name)

    def _launch(self, node: EjabberdNode) -> None:
        with contextlib.suppress(FileNotFoundError):
            (node.dir / "ejabberd.pid").unlink()
        log_file = node.dir / "logs" / "ejabberd.log"
        seen = log_file.stat().st_size if log_file.exists() else 0  # a restart appends
        out = open(node.dir / "console.log", "ab")  # noqa: SIM115 - the child holds it
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        entry = pwd.getpwnam(USER)
        env.update(HOME=entry.pw_dir, USER=USER, LOGNAME=USER)
        # started as the ejabberd user directly, not through ejabberdctl's su: su's pam_limits
        # would set the open-files limit back to 1024 (about 1,000 clients a node)
        node.proc = subprocess.Popen(node.ctl_args("foreground"), stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                                     cwd=node.dir / "spool", user=entry.pw_uid, group=entry.pw_gid,
                                     extra_groups=[], preexec_fn=_raise_nofile)
        out.close()
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:
            if node.proc.poll() is not None:
                raise BrokerStartError(f"{node.name} exited ({node.proc.returncode}): {self._tail(node)}")
            text = ""
            with contextlib.suppress(OSError), open(log_file, "rb") as f:
                f.seek(seen)
                text = f.read().decode("utf-8", "replace")
            if "Failed to start" in text or "address already in use" in text:
                raise BrokerStartError(f"{node.name} failed to start: {text[-1500:]}")
            # the port alone proves nothing: another process may hold it
            if _listens(node.beam_pid(), node.port) and wait_for_port("127.0.0.1", node.port, 0.2):
                return
            time.sleep(0.05)
        raise BrokerStartError(f"{node.name} did not start within 30 s: {self._tail(node)}")

    @staticmethod
    def _kill_group(node: EjabberdNode) -> None:
        if node.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(node.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.proc.wait(5)

    @staticmethod
    def _tail(node: EjabberdNode) -> str:
        parts = []
        for path in (node.dir / "console.log", node.dir / "logs" / "ejabberd.log", node.dir / "logs" / "error.log"):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace")[-1500:])
        return "\n".join(parts)


def main() -> int:
    """``python -m brokers.ejabberd [NODES]``: run a cluster until interrupted (prints its URLs)."""
    logging.basicConfig(level=logging.INFO)
    cluster = EjabberdCluster(nodes=int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    with cluster:
        print(cluster.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
