"""``autoglm nodes``: the ranked node list (with score parts) from a real broker and node."""

from __future__ import annotations

import asyncio
import json
import os
import sys

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
