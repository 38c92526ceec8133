"""Every CLI failure is one ``error:`` line plus a ``hint:``, exit 2 (usage) or 1 (runtime), no traceback.

The ``autoglm`` entry point runs in a subprocess (``python -m sdk``) with the real commands; the
shared mechanism (sdk.cli.errors, sdk.cli.options) is also driven in-process through CliRunner.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sdk.cli import app, errors, options

ROOT = Path(__file__).resolve().parent.parent
PASS = "cli errors passphrase"
CLOSED_BROKER = "mqtt://127.0.0.1:1"  # nothing listens on port 1


def autoglm(*args: str, tmp: Path, prelude: str = "", env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the console-script entry point in a fresh interpreter (``prelude`` runs first)."""
    code = f"{prelude}\nfrom sdk.__main__ import main\nmain()\n"
    base = {k: v for k, v in os.environ.items() if k != "AUTOGLM_DEBUG"}
    full_env = {**base, "PYTHONPATH": str(ROOT), "AUTOGLM_KEYSTORE": str(tmp / "ks.json"),
                "AUTOGLM_PASSPHRASE": PASS, "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp, env=full_env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def one_error(out: subprocess.CompletedProcess[str] | typer.testing.Result, reason: str, *,
              code: int, hint: str | None = None) -> str:
    """The stderr is exactly ``error: <reason>: ...`` (and a ``hint:`` line); returns the message."""
    stderr = out.stderr
    rc = out.returncode if isinstance(out, subprocess.CompletedProcess) else out.exit_code
    assert rc == code, (rc, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith(f"error: {reason}: "), stderr
    assert len(lines) <= 2, stderr
    if hint is not None:
        assert len(lines) == 2 and lines[1].startswith("hint: ") and hint in lines[1], stderr
    return lines[0][len(f"error: {reason}: "):]


# -- missing extras ------------------------------------------------------------------------------------

def test_missing_cli_extra_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    out = autoglm("--help", tmp=tmp_path, prelude="import sys; sys.modules['typer'] = None")
    message = one_error(out, "missing_extra", code=1, hint="pip install 'open-autoglm-sdk[cli]'")
    assert "'typer'" in message and out.stdout == ""


def test_missing_optional_dependency_names_its_extra(tmp_path: Path) -> None:
    out = autoglm("demo", "--plain", tmp=tmp_path, prelude="import sys; sys.modules['amqtt'] = None")
    message = one_error(out, "missing_extra", code=1, hint="open-autoglm-sdk[broker]")
    assert "amqtt" in message


def test_missing_torch_names_the_inference_extra(tmp_path: Path) -> None:
    out = autoglm("generate", "hello", tmp=tmp_path, prelude="import sys; sys.modules['torch'] = None")
    one_error(out, "missing_extra", code=1, hint="open-autoglm-sdk[inference]")


# -- bad arguments, checked before anything slow -------------------------------------------------------

@pytest.mark.parametrize("command", [
    ["serve"],
    ["coordinator", "--config", str(ROOT / "examples" / "coordinator.toml")],
    ["gateway", "--broker", CLOSED_BROKER, "--node-trust", "did:key:z6MkvRKZb5n7RXzdPYEGvXyGHfkB3iztGnLmPjBgZSmbnX8r"],
])
def test_bad_log_level_is_a_usage_error_before_loading(tmp_path: Path, command: list[str]) -> None:
    started = time.monotonic()
    out = autoglm(*command, "--log-level", "loud", tmp=tmp_path)
    one_error(out, "invalid_log_level", code=2, hint="debug, info, warning")
    assert time.monotonic() - started < 20  # refused before a model loads or a broker is dialled


@pytest.mark.parametrize("command", [
    ["nodes", "--broker", "127.0.0.1:1883"],
    ["gateway", "--broker", "localhost:1883",
     "--node-trust", "did:key:z6MkvRKZb5n7RXzdPYEGvXyGHfkB3iztGnLmPjBgZSmbnX8r"],
    ["serve", "--broker", "127.0.0.1:1883"],
    ["coordinator", "--config", str(ROOT / "examples" / "coordinator.toml"), "--broker", "localhost:1883"],
])
def test_broker_url_without_a_scheme_is_a_usage_error(tmp_path: Path, command: list[str]) -> None:
    started = time.monotonic()
    out = autoglm(*command, tmp=tmp_path)
    message = one_error(out, "invalid_broker_url", code=2, hint="mqtt://")
    assert "1883" in message
    assert time.monotonic() - started < 20  # before any model load


def test_missing_credential_file_is_named(tmp_path: Path) -> None:
    assert autoglm("id", "new", tmp=tmp_path).returncode == 0
    missing = tmp_path / "missing-vc.json"
    out = autoglm("gateway", "--broker", CLOSED_BROKER, "--credential", str(missing), "--port", "0",
                  "--node-trust", "did:key:z6MkvRKZb5n7RXzdPYEGvXyGHfkB3iztGnLmPjBgZSmbnX8r", tmp=tmp_path)
    assert out.returncode in (1, 2), out.stderr
    lines = out.stderr.strip().splitlines()
    assert "Traceback" not in out.stderr and len(lines) <= 2, out.stderr
    assert lines[0].startswith(("error: credential_not_found: ", "error: file_not_found: ")), out.stderr
    assert str(missing) in lines[0] and lines[-1].startswith("hint: "), out.stderr


def test_missing_file_argument_has_a_hint(tmp_path: Path) -> None:
    out = autoglm("vc", "verify", "nope.json", "--any-issuer", tmp=tmp_path)
    message = one_error(out, "file_not_found", code=1, hint="check the path")
    assert "nope.json" in message


def test_click_usage_errors_keep_exit_2(tmp_path: Path) -> None:
    out = autoglm("vc", "verify", tmp=tmp_path)
    assert out.returncode == 2 and "Missing argument" in out.stderr and "Traceback" not in out.stderr


# -- --json and --debug ---------------------------------------------------------------------------------

def _json_error(out: subprocess.CompletedProcess[str], reason: str, code: int) -> dict[str, object]:
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr and "error:" not in out.stderr, out.stderr
    doc = json.loads(out.stdout)
    assert doc["ok"] is False and doc["reason"] == reason
    assert doc["error"]["reason"] == reason and doc["error"]["message"]
    assert set(doc["error"]) == {"reason", "message", "hint"}
    return doc


def test_json_errors_are_json(tmp_path: Path) -> None:
    doc = _json_error(autoglm("vc", "verify", "nope.json", "--json", tmp=tmp_path), "file_not_found", 1)
    assert doc["error"]["hint"]
    _json_error(autoglm("devices", "--data-dir", str(tmp_path), "--json", tmp=tmp_path), "no_state", 1)
    usage = _json_error(autoglm("vc", "verify", "--json", tmp=tmp_path), "usage", 2)
    assert "file" in str(usage["error"]["message"]).lower()  # type: ignore[index]


def test_nodes_json_error_is_json(tmp_path: Path) -> None:
    _json_error(autoglm("nodes", "--broker", "127.0.0.1:1883", "--json", tmp=tmp_path), "invalid_broker_url", 2)


@pytest.mark.parametrize("how", ["front", "after", "env"])
def test_debug_shows_the_traceback(tmp_path: Path, how: str) -> None:
    args = {"front": ["--debug", "vc", "verify", "nope.json"], "after": ["vc", "verify", "nope.json", "--debug"],
            "env": ["vc", "verify", "nope.json"]}[how]
    out = autoglm(*args, tmp=tmp_path, env={"AUTOGLM_DEBUG": "1"} if how == "env" else None)
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr and "identity_cmds.py" in out.stderr
    assert out.stderr.strip().splitlines()[-2].startswith("error: file_not_found: ")
    assert "Traceback" not in autoglm("vc", "verify", "nope.json", tmp=tmp_path).stderr


# -- vc verify without a trust policy -------------------------------------------------------------------

def test_vc_verify_without_trust_is_not_verified(tmp_path: Path) -> None:
    assert autoglm("id", "new", tmp=tmp_path).returncode == 0
    cred = tmp_path / "self.json"
    issued = autoglm("vc", "issue", "-s", "did:example:x", "-t", "AdminCredential", "-o", str(cred), tmp=tmp_path)
    assert issued.returncode == 0, issued.stderr
    out = autoglm("vc", "verify", str(cred), tmp=tmp_path)
    message = one_error(out, "issuer_not_checked", code=1, hint="--any-issuer")
    assert message == "credential signature valid, issuer NOT checked (no --trust)"
    assert "verified" not in out.stdout
    accepted = autoglm("vc", "verify", str(cred), "--any-issuer", tmp=tmp_path)
    assert accepted.returncode == 0 and "credential verified" in accepted.stdout


# -- the shared mechanism, in process --------------------------------------------------------------------

def _probe_app() -> typer.Typer:
    probe = typer.Typer(cls=errors.GuardedGroup)

    @probe.command("boom")
    def boom(json_out: bool = typer.Option(False, "--json")) -> None:
        raise RuntimeError("kaput")

    @probe.command("usage")
    def usage() -> None:
        errors.fail("bad_flag", "--x wants a number", "pass --x 3", usage=True)

    @probe.command("guarded")
    def guarded(json_out: bool = typer.Option(False, "--json")) -> None:
        with errors.guard(as_json=json_out):
            raise PermissionError(13, "Permission denied", "/etc/secret")

    return probe


def test_unexpected_errors_are_one_line_with_a_debug_hint() -> None:
    result = CliRunner().invoke(_probe_app(), ["boom"])
    assert one_error(result, "unexpected_error", code=1, hint="--debug") == "RuntimeError: kaput"
    as_json = CliRunner().invoke(_probe_app(), ["boom", "--json"])
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["error"]["reason"] == "unexpected_error"


def test_fail_usage_exits_2_and_guard_maps_os_errors() -> None:
    one_error(CliRunner().invoke(_probe_app(), ["usage"]), "bad_flag", code=2, hint="pass --x 3")
    message = one_error(CliRunner().invoke(_probe_app(), ["guarded"]), "permission_denied", code=1,
                        hint="mode")
    assert message == "/etc/secret: permission denied"
    doc = json.loads(CliRunner().invoke(_probe_app(), ["guarded", "--json"]).stdout)
    assert doc["error"]["reason"] == "permission_denied"


def test_sdk_errors_keep_their_reason_and_get_the_table_hint() -> None:
    from sdk.errors import MissingExtra
    from sdk.identity.keystore import KeystoreError

    problem = errors.describe(KeystoreError("wrong passphrase for keystore k", reason="wrong_passphrase"))
    assert (problem.reason, problem.exit_code) == ("wrong_passphrase", 1) and "AUTOGLM_PASSPHRASE" in str(problem.hint)
    extra = errors.describe(MissingExtra("fastapi", "http", feature="autoglm serve"))
    assert extra.reason == "missing_extra" and "pip install" not in extra.message
    assert "open-autoglm-sdk[http]" in str(extra.hint)
    unknown = errors.describe(ModuleNotFoundError("No module named 'zzz'", name="zzz"))
    assert unknown.reason == "missing_module"


@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:1883", "mqtts://broker.example", "mqtt://u:p@h:1884"])
def test_broker_url_accepts(url: str) -> None:
    assert options.broker_url(url) == url


@pytest.mark.parametrize("url", ["127.0.0.1:1883", "localhost", "http://h:1883", "mqtt://:1883",
                                 "mqtt://h:99999", "mqtt://h:x", "mqtt://h/topic", "embedded"])
def test_broker_url_refuses(url: str) -> None:
    with pytest.raises(errors.CliError) as caught:
        options.broker_url(url)
    assert caught.value.reason == "invalid_broker_url" and caught.value.usage and "mqtt://" in str(caught.value.hint)


def test_embedded_only_where_allowed_and_log_levels() -> None:
    assert options.broker_url("embedded", allow_embedded=True) == "embedded"
    assert options.log_level("WARNING") == 30 and options.log_level("debug") == 10
    with pytest.raises(errors.CliError) as caught:
        options.log_level("loud")
    assert caught.value.reason == "invalid_log_level" and caught.value.usage


def test_hoist_debug_and_wants_json() -> None:
    assert errors.hoist_debug(["vc", "verify", "f", "--debug"]) == ["--debug", "vc", "verify", "f"]
    assert errors.hoist_debug(["x", "--", "--debug"]) == ["x", "--", "--debug"]
    assert errors.wants_json(["devices", "--json"]) and not errors.wants_json(["x", "--", "--json"])


# -- help texts that point somewhere real ----------------------------------------------------------------

def test_demo_help_keeps_rules_and_coordinator_help_points_to_examples(tmp_path: Path) -> None:
    runner = CliRunner()
    demo = runner.invoke(app, ["demo", "--help"], env={"COLUMNS": "200"})
    assert demo.exit_code == 0 and "[[rules]]" in demo.stdout
    coord = runner.invoke(app, ["coordinator", "--help"], env={"COLUMNS": "200"})
    pointer = re.search(r"--config.*?\bautoglm ([a-z][a-z -]*?) DIR", coord.stdout)
    assert pointer, coord.stdout  # the --config help names a command that writes a config...
    assert runner.invoke(app, [*pointer.group(1).split(), "--help"]).exit_code == 0  # ...which exists
    wrote = runner.invoke(app, ["examples", str(tmp_path / "ex")])
    assert wrote.exit_code == 0, wrote.output
    for name in ("coordinator.toml", "rules.toml"):
        assert (tmp_path / "ex" / name).read_bytes() == (ROOT / "examples" / name).read_bytes()
    again = runner.invoke(app, ["examples", str(tmp_path / "ex")])
    one_error(again, "file_exists", code=1, hint="--force")
    assert runner.invoke(app, ["examples", str(tmp_path / "ex"), "--force"]).exit_code == 0
