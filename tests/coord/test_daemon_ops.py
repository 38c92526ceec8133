"""Running the daemon: one per data directory, SIGHUP rule reloads, JSON logs (real subprocesses)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.coord.coordinator.auth import device_credential
from sdk.coord.coordinator.lock import DataDirLock
from sdk.coord.device import Device
from sdk.coord.events import screen_available
from sdk.errors import CoordinationError
from sdk.identity import Key
from sdk.identity.keystore import Keystore
from tests.fixtures.waiting import until

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "daemon-ops-test-passphrase"
runner = CliRunner()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_env(config_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOGLM_")}
    env.update(PYTHONPATH=str(ROOT), AUTOGLM_PASSPHRASE=PASSPHRASE, AUTOGLM_CONFIG_DIR=str(config_dir))
    return env


@dataclass
class Setup:
    """A directory written by ``autoglm coordinator init`` (embedded broker on a free port)."""

    directory: Path
    config_dir: Path
    port: int
    info: dict[str, Any]

    @property
    def config(self) -> Path:
        return self.directory / "coordinator.toml"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}?protocol=3.1.1"     # as the profile names it

    @property
    def coordinator(self) -> str:
        return str(self.info["coordinator"])

    def issuer(self) -> Key:
        return Keystore.open(self.directory / "issuer.keystore", PASSPHRASE).key


def init_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, broker: str | None = None) -> Setup:
    """Run ``coordinator init`` in this process (the env points the profile file into tmp_path)."""
    config_dir = tmp_path / "config"
    port = free_port()
    monkeypatch.setenv("AUTOGLM_CONFIG_DIR", str(config_dir))
    monkeypatch.setenv("AUTOGLM_PASSPHRASE", PASSPHRASE)
    for var in ("AUTOGLM_BROKER", "AUTOGLM_OPERATOR_KEYSTORE", "AUTOGLM_OPERATOR_CREDENTIAL",
                "AUTOGLM_COORDINATOR", "AUTOGLM_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    result = runner.invoke(app, ["coordinator", "init", str(tmp_path / "fleet"), "--json",
                                 "--broker", broker or f"embedded://127.0.0.1:{port}"])
    assert result.exit_code == 0, result.output
    return Setup(tmp_path / "fleet", config_dir, port, json.loads(result.stdout))


@dataclass
class Daemon:
    """``autoglm coordinator -c CONFIG --log-format json --log-file LOG`` in a subprocess."""

    proc: subprocess.Popen[bytes]
    log: Path
    seen: int = 0
    lines: list[dict[str, Any]] = field(default_factory=list)

    def read(self) -> list[dict[str, Any]]:
        if self.log.exists():
            text = self.log.read_text(encoding="utf-8")
            self.lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        return self.lines

    def has(self, event: str, after: int = 0) -> bool:
        return any(line.get("event") == event for line in self.read()[after:])

    async def wait(self, event: str, *, after: int = 0, timeout: float = 30.0) -> dict[str, Any]:
        def found() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"coordinator exited ({self.proc.returncode}) before {event!r}: "
                                     f"{self.proc.stderr.read().decode() if self.proc.stderr else ''}"
                                     f"{[line.get('msg') for line in self.read()]}")
            return self.has(event, after)
        await until(found, timeout, what=f"log event {event!r}")
        return next(line for line in self.read()[after:] if line.get("event") == event)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def spawn(setup: Setup, log: Path, *extra: str) -> Daemon:
    cmd = [sys.executable, "-m", "sdk", "coordinator", "-c", str(setup.config), "--log-format", "json",
           "--log-file", str(log), *extra]
    proc = subprocess.Popen(cmd, cwd=setup.directory, env=cli_env(setup.config_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return Daemon(proc, log)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Setup:
    return init_setup(tmp_path, monkeypatch)


@pytest.fixture
async def daemon(setup: Setup, tmp_path: Path) -> AsyncIterator[Daemon]:
    d = spawn(setup, tmp_path / "coordinator.log")
    try:
        await d.wait("started")
        yield d
    finally:
        d.stop()


class Devices:
    """Devices admitted by the subprocess coordinator (credentials from the init's issuer)."""

    def __init__(self, setup: Setup, stack: AsyncExitStack) -> None:
        self.setup = setup
        self.stack = stack
        self.issuer = setup.issuer()

    async def add(self, kind: str, room: str = "room:living", **kwargs: Any) -> Device:
        key = Key.generate()
        vc = device_credential(self.issuer, key.did, kind=kind, groups=[room])
        dev = Device(key, vc, broker=self.setup.url, coordinator=self.setup.coordinator, **kwargs)
        await dev.connect()
        self.stack.push_async_callback(dev.aclose)
        await dev.wait_admitted(15)
        return dev


@pytest.fixture
async def devices(setup: Setup) -> AsyncIterator[Devices]:
    async with AsyncExitStack() as stack:
        yield Devices(setup, stack)


# -- the data directory lock --------------------------------------------------------------------


def test_lock_refuses_a_second_holder_naming_its_pid(tmp_path: Path) -> None:
    first = DataDirLock(tmp_path)
    first.acquire()
    try:
        with pytest.raises(CoordinationError) as info:
            DataDirLock(tmp_path).acquire()
        assert info.value.reason == "locked" and f"process {os.getpid()}" in str(info.value)
    finally:
        first.release()
    with DataDirLock(tmp_path) as again:                 # released: the next one gets it
        assert again.held and again.holder() == os.getpid()


def test_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    code = ("import sys, time; from sdk.coord.coordinator.lock import DataDirLock; "
            f"DataDirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
        with pytest.raises(CoordinationError, match=f"process {proc.pid}"):
            DataDirLock(tmp_path).acquire()
    finally:
        proc.kill()
        proc.wait(10)
    assert DataDirLock(tmp_path).holder() == proc.pid      # the file (and its PID) is still there...
    with DataDirLock(tmp_path) as lock:                     # ...but the flock died with the process
        assert lock.held


@pytest.mark.broker
@pytest.mark.timeout(120)
async def test_second_daemon_on_the_same_data_dir_is_refused(setup: Setup, daemon: Daemon,
                                                            tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "sdk", "coordinator", "-c", str(setup.config)],
                          cwd=setup.directory, env=cli_env(setup.config_dir), capture_output=True,
                          timeout=60)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1, stderr
    assert "error: locked:" in stderr and f"process {daemon.proc.pid}" in stderr, stderr
    assert f"kill {daemon.proc.pid}" in stderr and "Traceback" not in stderr
    assert daemon.proc.poll() is None                       # the first one keeps running


@pytest.mark.broker
@pytest.mark.timeout(120)
async def test_coordinator_start_takes_the_lock_before_the_store(setup: Setup, daemon: Daemon) -> None:
    from sdk.coord.coordinator import Coordinator, load_config

    second = Coordinator.from_config(load_config(setup.config), broker=setup.url)
    with pytest.raises(CoordinationError) as info:
        await second.start()
    assert info.value.reason == "locked" and f"process {daemon.proc.pid}" in str(info.value)
    assert second.store is None and not second.started         # refused before the store opened
    assert DataDirLock(setup.directory / "data").holder() == daemon.proc.pid


# -- SIGHUP: reload and validate rules ---------------------------------------------------------

BROKEN_RULES = '[[rules]]\nname = "r"\nevent = "screen_available"\n[rules.when]\n"event.widht" = 800\n' \
               '[rules.target]\nselect = "sender"\n[rules.config]\na = 1\n'


@pytest.mark.broker
@pytest.mark.timeout(120)
async def test_sighup_with_a_broken_rules_file_keeps_serving_with_the_old_rules(
        setup: Setup, daemon: Daemon, devices: Devices) -> None:
    display = await devices.add("display")
    got: list[Any] = []
    phone = await devices.add("phone", on_config=got.append)

    (setup.directory / "rules.toml").write_text(BROKEN_RULES, encoding="utf-8")
    mark = len(daemon.read())
    daemon.proc.send_signal(signal.SIGHUP)
    failed = await daemon.wait("rules_reload_failed", after=mark)
    assert failed["reason"] == "invalid_rule" and failed["level"] == "ERROR"
    assert "keeping the 1 rule(s) in force" in failed["msg"] and "widht" in failed["msg"]
    assert daemon.proc.poll() is None

    await display.publish_event(screen_available(800, 600))   # the old rule still fires
    await phone.wait_version(1, 15)
    assert got[-1].state["ui.companion.resolution"] == "800x600"


@pytest.mark.broker
@pytest.mark.timeout(120)
async def test_sighup_with_a_good_rules_file_swaps_them(setup: Setup, daemon: Daemon, devices: Devices) -> None:
    display = await devices.add("display")
    got: list[Any] = []
    phone = await devices.add("phone", on_config=got.append)
    rules = setup.directory / "rules.toml"
    rules.write_text(rules.read_text(encoding="utf-8").replace('"ui.layout" = "companion"',
                                                               '"ui.layout" = "companion-v2"'), encoding="utf-8")
    mark = len(daemon.read())
    daemon.proc.send_signal(signal.SIGHUP)
    reloaded = await daemon.wait("rules_reloaded", after=mark)
    assert reloaded["rules"] == 1

    await display.publish_event(screen_available(1024, 768))
    await phone.wait_version(1, 15)
    assert got[-1].state["ui.layout"] == "companion-v2"


# -- logging -------------------------------------------------------------------------------------


@pytest.mark.broker
@pytest.mark.timeout(120)
async def test_json_log_lines_parse(setup: Setup, daemon: Daemon) -> None:
    started = await daemon.wait("started")
    assert started["did"] == setup.coordinator and started["pid"] == daemon.proc.pid
    daemon.stop()
    assert daemon.proc.returncode == 0
    lines = daemon.read()                                   # each one parsed as JSON by read()
    assert lines and all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
    assert any(line.get("event") == "stopped" for line in lines)
    assert all(line["ts"].endswith("Z") for line in lines)


@pytest.mark.parametrize("args, reason", [
    (["--log-level", "loud"], "invalid_log_level"),
    (["--log-format", "xml"], "invalid_log_format"),
])
def test_bad_log_options_are_one_line_usage_errors(setup: Setup, args: list[str], reason: str) -> None:
    result = runner.invoke(app, ["coordinator", "-c", str(setup.config), *args])
    assert result.exit_code == 2, result.output
    assert f"error: {reason}:" in result.output and "Traceback" not in result.output


def test_coordinator_without_config_is_a_usage_error() -> None:
    result = runner.invoke(app, ["coordinator"])
    assert result.exit_code == 2 and "error: missing_option:" in result.output
    assert "coordinator init" in result.output


def test_json_formatter_keeps_extra_fields() -> None:
    import logging

    from sdk.cli.logging_setup import JsonFormatter

    record = logging.LogRecord("sdk.test", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    record.device = "did:key:z6Mk"
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "hello world" and line["level"] == "WARNING" and line["device"] == "did:key:z6Mk"


def test_devices_json_errors_are_json(tmp_path: Path) -> None:
    result = runner.invoke(app, ["devices", "--data-dir", str(tmp_path), "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["reason"] == "no_state" and "no coordinator state" in doc["error"]["message"]


def test_text_logs_to_a_file_without_the_brokers_connection_chatter(tmp_path: Path) -> None:
    import logging

    from sdk.cli.logging_setup import setup_logging

    root = logging.getLogger()
    level = root.level
    handler = setup_logging(level="info", fmt="text", file=tmp_path / "logs" / "c.log")
    try:
        logging.getLogger("sdk.coord.test").info("device %s admitted", "did:key:z6Mk")
        logging.getLogger("amqtt.broker").info("client connected")         # chatter: dropped at info
        logging.getLogger("amqtt.broker").warning("listener failed")
        handler.flush()
        text = (tmp_path / "logs" / "c.log").read_text(encoding="utf-8")
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(level)
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.NOTSET)
    assert "INFO sdk.coord.test: device did:key:z6Mk admitted" in text
    assert "listener failed" in text and "client connected" not in text
