"""Run a real PostgreSQL server (Debian's package) on a free loopback port, for tests and benchmarks.

``PostgresServer().start()`` runs ``initdb`` into a private directory and starts ``postgres`` in
the foreground listening on 127.0.0.1 only, with trust authentication for local connections
(the loopback listener and the private Unix socket; nothing else is reachable). PostgreSQL
refuses to run as root: as root the runner runs it as the ``postgres`` system user (created by
the package) through ``runuser``, with the data and socket directories owned by that user.

The server is for tests: ``fsync``, ``synchronous_commit`` and ``full_page_writes`` are off
(a crash of the machine may lose the last commits; a crash of a client never does). Pass
``durable=True`` for the production settings. ``create_database()`` copies ``template1``
(milliseconds), so every test gets a database of its own.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from brokers.mosquitto import free_port

log = logging.getLogger(__name__)

SYSTEM_USER = "postgres"
SUPERUSER = "postgres"


class PostgresStartError(RuntimeError):
    """initdb or the server failed, or the server never became ready."""


def find_bindir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres`` (PATH first, then the newest Debian version)."""
    found = shutil.which("initdb")
    if found and Path(found).with_name("postgres").exists():
        return Path(found).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def available() -> str | None:
    """None when a server can be started here, else why not (for a skip or a failure message)."""
    if find_bindir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"running as root and there is no {SYSTEM_USER!r} user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is not installed"
    return None


class PostgresServer:
    """One PostgreSQL server in a private directory on ``127.0.0.1:port``."""

    def __init__(self, *, work_dir: str | Path | None = None, port: int | None = None,
                 durable: bool = False, start_timeout: float = 30.0) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise PostgresStartError("PostgreSQL is not installed (apt-get install postgresql)")
        self.bindir = bindir
        self._own_dir = work_dir is None
        self.dir = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="autoglm-pg-"))
        self.data_dir = self.dir / "data"
        self.socket_dir = self.dir / "socket"
        self.port = port or free_port()
        self.durable = durable
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._names = itertools.count(1)
        self._as_user = os.geteuid() == 0

    # -------------------------------------------------------------- process
    def _cmd(self, *args: str) -> list[str]:
        return ["runuser", "-u", SYSTEM_USER, "--", *args] if self._as_user else list(args)

    def _own(self, path: Path) -> None:
        if self._as_user:
            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def _initdb(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._own(self.dir)
        self.socket_dir.mkdir(exist_ok=True)
        self._own(self.socket_dir)
        out = subprocess.run(self._cmd(str(self.bindir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                                       "-A", "trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
                                       "--no-instructions"),
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise PostgresStartError(f"initdb failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")

    def start(self) -> PostgresServer:
        """initdb on first start, then start the server and wait until it accepts connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        settings = {"listen_addresses": "127.0.0.1", "port": str(self.port),
                    "unix_socket_directories": str(self.socket_dir), "max_connections": "200",
                    "shared_buffers": "32MB", "logging_collector": "off", "log_min_messages": "warning"}
        if not self.durable:
            settings.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        args = [str(self.bindir / "postgres"), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        log_path = self.dir / "postgres.log"
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self._cmd(*args), stdout=log_file, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._wait_ready(log_path)
        log.info("PostgreSQL %s on 127.0.0.1:%d (%s)", self.version(), self.port, self.dir)
        return self

    def _wait_ready(self, log_path: Path) -> None:
        """postgres writes "ready" as the status line of postmaster.pid once it accepts connections."""
        deadline = time.monotonic() + self.start_timeout
        pid_file = self.data_dir / "postmaster.pid"
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise PostgresStartError(f"postgres exited with {self.proc.returncode}: {_tail(log_path)}")
            with contextlib.suppress(OSError):
                lines = pid_file.read_text().splitlines()
                if len(lines) >= 8 and lines[7].strip() == "ready":
                    return
            time.sleep(0.01)
        self.stop()
        raise PostgresStartError(f"postgres not ready after {self.start_timeout:.0f} s: {_tail(log_path)}")

    def stop(self, *, timeout: float = 10.0) -> None:
        """Fast shutdown (SIGINT: abort sessions, checkpoint); SIGKILL if it takes too long."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(proc)

    def kill(self, proc: subprocess.Popen[bytes] | None = None) -> None:
        """SIGKILL the server's process group (a crash: the next start recovers from the WAL)."""
        proc = proc or self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        if proc is self.proc:
            self.proc = None
        with contextlib.suppress(OSError):          # a killed postmaster leaves its pid file behind
            (self.data_dir / "postmaster.pid").unlink()

    def restart(self) -> PostgresServer:
        """Stop and start again on the same port and data."""
        self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop the server and remove its directory (when the runner made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -------------------------------------------------------------- databases
    def url(self, dbname: str = "postgres", *, user: str = SUPERUSER) -> str:
        """A libpq URL for ``dbname`` on this server (TCP on the loopback port)."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def _admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.url(), autocommit=True, connect_timeout=10)

    def version(self) -> str:
        """The server's version string (``15.8``...)."""
        with self._admin() as conn:
            return str(conn.execute("SHOW server_version").fetchone()[0])

    def create_database(self, name: str | None = None) -> str:
        """A new empty database copied from ``template1``; returns its name."""
        name = name or f"t{os.getpid()}_{next(self._names)}"
        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name must be letters, digits and _: {name!r}")
        with self._admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template1 STRATEGY FILE_COPY')
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending its sessions first."""
        with self._admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def fresh_url(self) -> str:
        """The URL of a new empty database (one per test: tests never share state)."""
        return self.url(self.create_database())


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


__all__ = ["PostgresServer", "PostgresStartError", "available", "find_bindir"]
