"""`autoglm fleet` and `autoglm coordinator init`: arguments, profiles, output, errors, and the
whole path init → coordinator → token/enroll → ls/show/set/tag/call/revoke/audit on both brokers."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.cli.fleet_cmds import (
    build_where,
    devices_table,
    parse_assignments,
    parse_target,
    parse_value,
    short_did,
)
from sdk.cli.profiles import ProfileError, resolve, save_profile
from sdk.coord.coordinator import Coordinator, load_config
from sdk.coord.coordinator.auth import operator_credential
from sdk.coord.device import Device
from sdk.identity import Key
from sdk.identity.keystore import Keystore
from tests.coord.test_daemon_ops import PASSPHRASE, Setup, init_setup
from tests.fixtures.waiting import until

runner = CliRunner()
DID = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


def error_of(result: Any) -> dict[str, Any]:
    doc = json.loads(result.stdout)
    assert doc["ok"] is False, doc
    return dict(doc["error"], reason=doc["reason"])


# -- argument parsing -------------------------------------------------------------------------


def test_values_are_json_when_they_parse_else_text() -> None:
    assert parse_value("3") == 3 and parse_value("true") is True and parse_value('{"a": [1]}') == {"a": [1]}
    assert parse_value("v3") == "v3" and parse_value("") == "" and parse_value("1x2") == "1x2"
    assert parse_assignments(["ui.layout=v3", "level=0.5", "note=a=b"]) == {
        "ui.layout": "v3", "level": 0.5, "note": "a=b"}


def test_targets() -> None:
    assert parse_target(DID, None) == {"did": DID}
    assert parse_target("group:room:living", None) == {"group": "room:living"}
    assert parse_target("tag:canary", None) == {"tag": "canary"}
    assert parse_target(None, '{"kind": "phone"}') == {"where": {"kind": "phone"}}


def test_ls_flags_become_the_where() -> None:
    where = build_where(kind="phone", group="room:living", presence="online", version_lt=3, converged=False,
                        state=["layout=v3"], attr=["room=living"], desired_version=">=2",
                        where='{"capability": "ui.companion"}')
    assert where == {"capability": "ui.companion", "kind": "phone", "group": "room:living",
                     "presence": "online", "converged": False, "reported_version": {"lt": 3},
                     "desired_version": {"ge": 2}, "state": {"layout": "v3"}, "attributes": {"room": "living"}}


@pytest.mark.parametrize("args, needle", [
    (["ls", "--limit", "0"], "--limit must be between 1 and 1000"),
    (["ls", "--presence", "sleeping"], "--presence must be one of"),
    (["ls", "--where", "{kind: phone}"], "--where is not valid JSON"),
    (["ls", "--where", "[1]"], "--where must be a JSON object"),
    (["ls", "--desired-version", "about:3"], "--desired-version wants N"),
    (["set", DID, "ui.layout"], "expected KEY=VALUE"),
    (["set", DID], "no KEY=VALUE to set"),
    (["set", "group:", "a=1"], "group: needs a name"),
    (["unset", DID], "no KEY to unset"),
    (["tag", DID], "nothing to do"),
    (["call", DID, "ping", "--timeout", "90"], "--timeout must be between 0 and 60"),
    (["call", DID, "ping", "--args", "[1, 2]"], "--args must be a JSON object"),
    (["revoke", DID, "--reason", " "], "--reason is empty"),
    (["token", "--kind", "phone", "--approve", "maybe"], "--approve must be auto or manual"),
    (["token", "--kind", "phone", "--uses", "0"], "--uses must be between"),
    (["audit", "--limit", "5000"], "--limit must be between 1 and 500"),
])
def test_bad_arguments_are_usage_errors_before_connecting(args: list[str], needle: str,
                                                          monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOGLM_CONFIG_DIR", str(tmp_path))         # no profile: nothing to connect to
    result = invoke("fleet", *args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: invalid_option:") and needle in result.output, result.output
    assert "Traceback" not in result.output
    as_json = invoke("fleet", *args, "--json")
    assert as_json.exit_code == 2
    err = error_of(as_json)
    assert err["reason"] == "invalid_option" and needle in err["message"]


# -- connection settings: flags > environment > profile ----------------------------------------


def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOGLM_CONFIG_DIR", str(tmp_path / "cfg"))
    for var in ("AUTOGLM_BROKER", "AUTOGLM_OPERATOR_KEYSTORE", "AUTOGLM_OPERATOR_CREDENTIAL",
                "AUTOGLM_COORDINATOR", "AUTOGLM_PROFILE"):
        monkeypatch.delenv(var, raising=False)


def test_settings_resolve_flag_over_env_over_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch, tmp_path)
    save_profile("home", {"broker": "mqtt://profile:1883", "coordinator": DID, "keystore": "~/op.keystore",
                          "credential": "/p/op-vc.json"})
    save_profile("lab", {"broker": "mqtt://lab:1883", "coordinator": DID, "keystore": "/lab/k",
                         "credential": "/lab/c"}, make_default=False)
    conn = resolve({})
    assert conn.profile == "home" and conn.broker == "mqtt://profile:1883"     # the first one saved is default
    assert conn.keystore == Path("~/op.keystore").expanduser()
    monkeypatch.setenv("AUTOGLM_BROKER", "mqtt://env:1883")
    assert resolve({}).broker == "mqtt://env:1883"
    assert resolve({"broker": "mqtt://flag:1883"}).broker == "mqtt://flag:1883"
    assert resolve({}, profile="lab").keystore == Path("/lab/k")
    monkeypatch.setenv("AUTOGLM_PROFILE", "lab")
    assert resolve({}).credential == Path("/lab/c")
    with pytest.raises(ProfileError) as info:
        resolve({}, profile="nope")
    assert info.value.reason == "unknown_profile" and "home, lab" in str(info.value)


def test_no_settings_is_a_usage_error_with_a_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch, tmp_path)
    result = invoke("fleet", "ls")
    assert result.exit_code == 2
    assert "error: no_connection: no broker, coordinator, keystore, credential" in result.output
    assert "hint: run autoglm coordinator init DIR" in result.output
    err = error_of(invoke("fleet", "ls", "--json", "--broker", "mqtt://127.0.0.1:1"))
    assert err["reason"] == "no_connection"
    assert err["message"] == "no coordinator, keystore, credential for the operator connection"
    bad = invoke("fleet", "ls", "--profile", "missing")
    assert bad.exit_code == 2 and "error: unknown_profile:" in bad.output


def test_a_broker_that_is_not_a_url_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch, tmp_path)
    result = invoke("fleet", "ls", "--broker", "localhost:1883", "--coordinator", DID, "--keystore", "k",
                    "--credential", "c")
    assert result.exit_code == 2 and "error: invalid_broker_url:" in result.output
    half = invoke("fleet", "ls", "--broker", "mqtts://h:8883", "--coordinator", DID, "--keystore", "k",
                  "--credential", "c", "--cert", "client.pem")
    assert half.exit_code == 2 and "--cert and --key-file go together" in half.output


def test_a_malformed_profile_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _clean_env(monkeypatch, tmp_path)
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "profiles.toml").write_text('[profiles.x]\nbrokr = "mqtt://a"\n')
    result = invoke("fleet", "ls")
    assert result.exit_code == 2 and "unknown key(s) ['brokr']" in result.output


# -- output ------------------------------------------------------------------------------------


def test_ls_table_fits_80_columns() -> None:
    from rich.console import Console

    rows = [{"did": Key.generate().did, "kind": "smartphone-xl", "state": "online",
             "groups": ["room:living", "floor:1"], "tags": ["canary"], "desired_version": 12,
             "reported_version": 11, "converged": False, "last_seen": 1_000_000.0} for _ in range(3)]
    out = io.StringIO()
    Console(file=out, width=80, emoji=False, highlight=False).print(devices_table(rows, total=40, now=1_000_042.0))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "devices (3 of 40)" in lines[0]
    assert short_did(rows[0]["did"]) in out.getvalue() and "11/12*" in out.getvalue() and "42s ago" in out.getvalue()


# -- coordinator init --------------------------------------------------------------------------


def test_init_writes_a_config_that_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    setup = init_setup(tmp_path, monkeypatch)
    cfg = load_config(setup.config)
    assert cfg.issuer is not None and len(cfg.rules) == 1 and cfg.broker.startswith("embedded://")
    issuer = setup.issuer().did
    assert {t.issuer: set(t.types) for t in cfg.trust} == {issuer: {"DeviceCredential", "OperatorCredential"}}
    operator = json.loads((setup.directory / "operator-vc.json").read_text())
    assert operator["issuer"] == issuer and operator["credentialSubject"]["roles"] == ["admin"]
    assert (setup.directory / "operator-vc.json").stat().st_mode & 0o077 == 0
    conn = resolve({})
    assert conn.coordinator == setup.coordinator and conn.broker == setup.url
    assert setup.info["next"][0] == f"autoglm coordinator -c {setup.config}"
    again = invoke("coordinator", "init", str(setup.directory))
    assert again.exit_code == 1 and "error: already_initialized:" in again.output and "--force" in again.output


def test_init_needs_a_broker_address_operators_can_reach(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_CONFIG_DIR", str(tmp_path / "cfg"))
    for broker, reason in (("embedded", "invalid_broker_url"), ("localhost:1883", "invalid_broker_url"),
                           ("embedded://127.0.0.1:99999", "invalid_broker_url")):
        result = invoke("coordinator", "init", str(tmp_path / "d"), "--broker", broker)
        assert result.exit_code == 2 and f"error: {reason}:" in result.output, result.output
    assert not (tmp_path / "d").exists()


def test_init_without_a_passphrase_generates_one_and_prints_it_once(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOGLM_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.delenv("AUTOGLM_PASSPHRASE", raising=False)
    result = invoke("coordinator", "init", str(tmp_path / "d"), "--broker", "mqtt://127.0.0.1:1883")
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "export AUTOGLM_PASSPHRASE=" in x)
    secret = line.split("=", 1)[1]
    assert len(secret) >= 20
    Keystore.open(tmp_path / "d" / "operator.keystore", secret)             # it opens the keystores
    assert "autoglm coordinator -c" in result.output and "autoglm fleet ls" in result.output


# -- end to end on both brokers ----------------------------------------------------------------


class Fleet:
    """An init'ed directory, its coordinator running in this process, and the CLI pointed at it."""

    def __init__(self, setup: Setup, coord: Coordinator, url: str, stack: AsyncExitStack) -> None:
        self.setup = setup
        self.coord = coord
        self.url = url
        self.stack = stack

    async def cli(self, *args: str, code: int = 0) -> Any:
        """Run ``autoglm fleet ARGS --json`` (in a worker thread: the CLI runs its own event loop)."""
        result = await asyncio.to_thread(runner.invoke, app, ["fleet", *args, "--json", "--broker", self.url])
        assert result.exit_code == code, result.output
        doc = json.loads(result.stdout)
        return doc["result"] if code == 0 else dict(doc["error"], reason=doc["reason"])

    async def enrolled_device(self, token: str, **kwargs: Any) -> Device:
        key = Key.generate()
        credential = await Device.enroll(key, broker=self.url, coordinator=self.coord.did, token=token)
        dev = Device(key, credential, broker=self.url, coordinator=self.coord.did, **kwargs)
        await dev.connect()
        self.stack.push_async_callback(dev.aclose)
        await dev.wait_admitted(15)
        return dev


@pytest.fixture
async def fleet(broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Fleet]:
    setup = init_setup(tmp_path, monkeypatch, broker=broker.url)
    coord = Coordinator.from_config(load_config(setup.config), broker=broker.url)
    await coord.start()
    try:
        async with AsyncExitStack() as stack:
            yield Fleet(setup, coord, broker.url, stack)
    finally:
        await coord.stop()


@pytest.mark.broker
@pytest.mark.timeout(180)
async def test_operator_runbook_end_to_end(fleet: Fleet, tmp_path: Path) -> None:
    token = await fleet.cli("token", "--kind", "phone", "--group", "room:living", "--uses", "1")
    configs: list[Any] = []
    phone = await fleet.enrolled_device(token["token"], on_config=configs.append)
    phone.register_command("ping", lambda args: {"pong": args})

    page = await fleet.cli("ls", "--kind", "phone")
    assert page["total"] == 1 and [d["did"] for d in page["devices"]] == [phone.did]
    assert page["devices"][0]["groups"] == ["room:living"]
    assert (await fleet.cli("ls", "--count", "--presence", "online")) == {"total": 1}

    shown = await fleet.cli("show", short_did(phone.did).rstrip("…"))          # the prefix ls prints
    assert shown["did"] == phone.did and shown["kind"] == "phone" and shown["presence"] == "online"

    changed = await fleet.cli("set", phone.did, "ui.layout=v4", "brightness=0.5")
    assert changed["count"] == 1 and changed["versions"] == {phone.did: 1}
    await phone.wait_version(1, 15)
    assert configs[-1].state == {"ui.layout": "v4", "brightness": 0.5}

    assert (await fleet.cli("tag", "group:room:living", "--add", "canary"))["count"] == 1
    assert [d["did"] for d in (await fleet.cli("ls", "--tag", "canary"))["devices"]] == [phone.did]

    called = await fleet.cli("call", phone.did, "ping", "--args", '{"n": 2}', "--timeout", "5")
    assert called == {"result": {"pong": {"n": 2}}}
    missing = await fleet.cli("call", phone.did, "reboot", code=1)
    assert missing["reason"] == "no_such_method" and "no handler" in missing["hint"]

    # a read-only operator may look but not revoke
    reader = Key.generate()
    Keystore.create(tmp_path / "reader.keystore", PASSPHRASE, reader)
    (tmp_path / "reader-vc.json").write_text(json.dumps(operator_credential(fleet.setup.issuer(), reader.did,
                                                                            roles=("read",))))
    as_reader = ("--keystore", str(tmp_path / "reader.keystore"), "--credential", str(tmp_path / "reader-vc.json"))
    assert (await fleet.cli("ls", *as_reader))["total"] == 1
    refused = await fleet.cli("revoke", phone.did, "--reason", "stolen", *as_reader, code=1)
    assert refused["reason"] == "forbidden" and "needs role admin" in refused["hint"]

    revoked = await fleet.cli("revoke", phone.did, "--reason", "stolen")
    assert revoked["did"] == phone.did and revoked["published"] is True
    await until(lambda: phone.state == "revoked", 5, what="the phone is cut off")
    after = await fleet.cli("show", phone.did)
    assert after["presence"] == "revoked" and after["credential"]["status"] == "revoked"

    # a manual token: the enrollment waits until an admin approves it
    manual = await fleet.cli("token", "--kind", "display", "--group", "room:living", "--approve", "manual")
    display_key = Key.generate()
    enrolling = asyncio.ensure_future(Device.enroll(display_key, broker=fleet.url, coordinator=fleet.coord.did,
                                             token=manual["token"], wait=60))
    pending: list[Any] = []

    async def listed() -> bool:
        pending[:] = (await fleet.cli("pending"))["requests"]
        return bool(pending)

    while not await listed():
        assert not enrolling.done(), enrolling.exception()
    assert [r["did"] for r in pending] == [display_key.did]
    approved = await fleet.cli("approve", pending[0]["id"])
    assert approved["did"] == display_key.did and approved["approved"] is True
    issued = await asyncio.wait_for(enrolling, 30)
    assert issued["credentialSubject"]["id"] == display_key.did
    assert (await fleet.cli("pending"))["requests"] == []
    display = Device(display_key, issued, broker=fleet.url, coordinator=fleet.coord.did)
    await display.connect()
    fleet.stack.push_async_callback(display.aclose)
    await display.wait_admitted(15)

    first = await fleet.cli("ls", "--limit", "1")                         # paging
    assert first["total"] == 2 and len(first["devices"]) == 1 and first["next_cursor"]
    everything = await fleet.cli("ls", "--limit", "1", "--all")
    assert sorted(d["did"] for d in everything["devices"]) == sorted([phone.did, display.did])
    assert everything["next_cursor"] is None

    audit = await fleet.cli("audit", "--op", "device.revoke")
    outcomes = sorted(e["outcome"] for e in audit["entries"])
    assert outcomes == ["forbidden", "ok"], audit


@pytest.mark.broker
@pytest.mark.timeout(120)
async def test_errors_from_the_coordinator_have_reasons_and_hints(fleet: Fleet) -> None:
    nobody = await fleet.cli("show", DID, code=1)
    assert nobody["reason"] == "not_found"
    silent = await fleet.cli("ls", "--coordinator", Key.generate().did, "--request-timeout", "1", code=1)
    assert silent["reason"] == "timeout" and "is the coordinator running" in silent["hint"]
    text = await asyncio.to_thread(runner.invoke, app, ["fleet", "show", DID, "--broker", fleet.url])
    assert text.exit_code == 1 and text.output.startswith("error: not_found:") and "hint: " in text.output


@pytest.mark.broker
@pytest.mark.mosquitto
@pytest.mark.timeout(120)
async def test_fleet_over_mosquitto_secure_mode_with_tls_flags(mosquitto_secure: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The secure default (TLS client certificates, %u ACL): --ca/--cert/--key-file reach the coordinator."""
    from sdk.identity import TrustPolicy
    from sdk.messaging.transport import TLSConfig
    from tests.fixtures.brokers import SECURE_ADMIN

    m = mosquitto_secure
    setup = init_setup(tmp_path, monkeypatch, broker=m.url)
    issuer = setup.issuer()
    coord_cert = m.issue_client_cert(SECURE_ADMIN.did, tmp_path / "certs")
    coord = Coordinator(SECURE_ADMIN, broker=m.url, data_dir=tmp_path / "data", issuer=issuer,
                        trust=TrustPolicy({issuer.did: {"OperatorCredential"}}),
                        tls=TLSConfig(ca_file=str(m.pki.ca), cert_file=str(coord_cert.cert),
                                      key_file=str(coord_cert.key)))
    await coord.start()
    try:
        operator = json.loads((setup.directory / "operator-vc.json").read_text())["credentialSubject"]["id"]
        cert = m.issue_client_cert(operator, tmp_path / "certs")
        tls = ["--ca", str(m.pki.ca), "--cert", str(cert.cert), "--key-file", str(cert.key)]
        args = ["fleet", "ls", "--json", "--coordinator", SECURE_ADMIN.did, "--request-timeout", "5"]
        result = await asyncio.to_thread(runner.invoke, app, [*args, *tls])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["result"]["total"] == 0
        bare = await asyncio.to_thread(runner.invoke, app, args)          # no client certificate: refused
        assert bare.exit_code == 1 and error_of(bare)["reason"] in ("connect_failed", "connect_timeout")
    finally:
        await coord.stop()
