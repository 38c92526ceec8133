"""``autoglm nodes``: the ranked node list (with score parts) from a real broker and node."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

import pytest

from tests.mesh.conftest import MODEL, MeshEnv

pytestmark = [pytest.mark.model, pytest.mark.broker, pytest.mark.slow]


async def test_autoglm_nodes_json_and_table(embedded_env: MeshEnv) -> None:
    node = await embedded_env.node(0)
    for args in (["--json"], []):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from sdk.cli import main; main()", "nodes", "--broker", embedded_env.url, "--wait", "1.5", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "COLUMNS": "220"})
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        if args:
            rows = json.loads(out)
            assert [r["node"] for r in rows] == [node.node_id]
            assert rows[0]["models"] == [MODEL] and rows[0]["did"] == node.did
            assert set(rows[0]["parts"]) == {"throughput", "stability", "load", "latency"}
        else:
            assert node.node_id in out.decode() and "stability" in out.decode()


async def test_serve_node_mode_attachment(embedded_env: MeshEnv, node_engines: list[Any], peer_key: Any,
                                          access_vc: Any, access_issuer: Any) -> None:
    """What `autoglm serve --broker ... --trust ...` attaches to its engine: a working mesh node."""
    from sdk.cli.mesh_cmds import node_attachment
    from sdk.identity import Key

    key = Key.generate()
    attach = node_attachment(embedded_env.url, key, trust=[access_issuer.did], node_id="served",
                             credential=embedded_env.node_credential(key, "served"), advert_interval=1.0)
    async with attach(node_engines[0]) as node:
        mesh = await embedded_env.router(peer_key, [access_vc])
        result = await mesh.generate(prompt="Hi", max_new_tokens=3, temperature=0.0)
        assert result.usage.completion_tokens >= 1 and node.served == 1 and node.node_id == "served"


def test_serve_node_mode_needs_a_trusted_issuer() -> None:
    from typer.testing import CliRunner

    from sdk.cli import app

    result = CliRunner().invoke(app, ["serve", "--broker", "mqtt://127.0.0.1:1", "--port", "0"])
    assert result.exit_code == 2 and "--trust" in result.output
    help_text = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--broker" in help_text and "--model-path" in help_text and "--peer-rate" in help_text
    assert "--node-credential" in help_text and "--status-file" in help_text


def test_gateway_needs_a_node_trust_issuer() -> None:
    from typer.testing import CliRunner

    from sdk.cli import app

    result = CliRunner().invoke(app, ["gateway", "--broker", "mqtt://127.0.0.1:1", "--port", "0"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "--node-trust" in result.output


async def _autoglm(*args: str, columns: int = 80) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from sdk.cli import main; main()", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": str(columns)})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_nodes_table_fits_80_columns(embedded_env: MeshEnv) -> None:
    long_id = "node-with-a-rather-long-identifier-0"
    await embedded_env.node(0, node_id=long_id)
    code, out, err = await _autoglm("nodes", "--broker", embedded_env.url, "--wait", "1.5")
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80, out
    assert "score" in out and "node-with-a" in out and "stability" not in out  # the short table
    assert len([line for line in lines if "node-with-a" in line]) == 1  # one line per node
    code, out, err = await _autoglm("nodes", "--broker", embedded_env.url, "--wait", "1.5", "--wide")
    assert code == 0, err
    assert long_id in out and "stability" in out and "latency" in out


async def test_nodes_json_errors_are_json() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for args, code, reason in ((["--broker", "127.0.0.1:1883"], 2, "invalid_broker_url"),
                               (["--broker", f"mqtt://127.0.0.1:{port}", "--wait", "0"], 1, "connect_failed")):
        got, out, err = await _autoglm("nodes", *args, "--json")
        doc = json.loads(out)
        assert got == code and doc["ok"] is False and doc["reason"] == reason, (out, err)
        assert doc["error"]["hint"] and "Traceback" not in err


def test_gateway_and_serve_check_the_broker_url_first() -> None:
    from typer.testing import CliRunner

    from sdk.cli import app

    for args in (["gateway", "--broker", "localhost:1883", "--node-trust", "did:key:z6Mkx"],
                 ["serve", "--broker", "http://127.0.0.1:1883", "--trust", "did:key:z6Mkx"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "invalid_broker_url" in result.output, result.output
