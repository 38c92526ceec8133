"""The OpenAI gateway: the official ``openai`` client talks to the mesh through the same HTTP app."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from sdk.identity import Key
from sdk.inference import GenerationRequest
from sdk.inference.server import HTTPServer
from sdk.mesh import issue_access_credential
from sdk.mesh.gateway import create_gateway_app
from tests.fixtures.waiting import until
from tests.mesh.conftest import MODEL, MeshEnv

pytestmark = [pytest.mark.model, pytest.mark.broker, pytest.mark.slow]


async def test_openai_client_through_the_mesh(embedded_env: MeshEnv, node_engines: list[Any], peer_key: Key,
                                              access_vc: Any, access_issuer: Key) -> None:
    node = await embedded_env.node(0)
    mesh = await embedded_env.router(peer_key, [access_vc])
    messages = [{"role": "user", "content": "Name a colour."}]
    reference = await node_engines[2].generate(GenerationRequest(messages=messages, max_new_tokens=8, temperature=0.0))
    completion_ref = await node_engines[2].generate(GenerationRequest(prompt="One, two,", max_new_tokens=5,
                                                                      temperature=0.0))

    async with HTTPServer(create_gateway_app(mesh), port=0) as server:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0)
        models = await client.models.list()
        assert [m.id for m in models.data] == [MODEL]

        chat = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
        assert chat.choices[0].message.content == reference.text
        assert chat.usage.completion_tokens == len(reference.token_ids)

        stream = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == reference.text

        done = await client.completions.create(model=MODEL, prompt="One, two,", max_tokens=5, temperature=0)
        assert done.choices[0].text == completion_ref.text

        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
        await client.close()
    assert node.served == 3

    # a second model on the mesh: the gateway routes on the model the client names
    other = await embedded_env.node(1, model_name="smol-b")
    await mesh.wait_for_nodes(1, model="smol-b")
    mesh.client.credentials += (issue_access_credential(access_issuer, peer_key.did, models=["smol-b"]),)
    async with HTTPServer(create_gateway_app(mesh), port=0) as server:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0)
        assert sorted(m.id for m in (await client.models.list()).data) == sorted([MODEL, "smol-b"])
        done = await client.completions.create(model="smol-b", prompt="One, two,", max_tokens=5, temperature=0)
        assert done.choices[0].text == completion_ref.text and done.model == "smol-b"
        await client.completions.create(model=MODEL, prompt="One, two,", max_tokens=5, temperature=0)
        await client.close()
    assert other.served == 1 and node.served == 4

    stranger = Key.generate()  # a peer without the credential gets 403 through the gateway
    denied = await embedded_env.router(stranger, [])
    async with HTTPServer(create_gateway_app(denied), port=0) as server:
        client = openai.AsyncOpenAI(base_url=server.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as info:
            await client.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert "not_authorized" in str(info.value)
        await client.close()


def _base(server: HTTPServer) -> str:
    return server.url.removesuffix("/v1")


async def test_no_node_is_503_and_health_follows_live_nodes(embedded_env: MeshEnv, peer_key: Key,
                                                            access_vc: Any) -> None:
    mesh = await embedded_env.router(peer_key, [access_vc], nodes=0)
    body = {"model": MODEL, "prompt": "One, two,", "max_tokens": 2, "temperature": 0}
    async with HTTPServer(create_gateway_app(mesh), port=0) as server, \
            httpx.AsyncClient(base_url=_base(server), timeout=60) as http:
        health = await http.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "unavailable", "nodes": 0}
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "no_node_available" and r.json()["error"]["type"] == "service_unavailable"

        node = await embedded_env.node(0)
        await mesh.wait_for_nodes(1, model=MODEL)
        health = await http.get("/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok" and health.json()["nodes"] == 1 and health.json()["models"] == [MODEL]
        assert (await http.post("/v1/completions", json=body)).status_code == 200
        unknown = await http.post("/v1/completions", json={**body, "model": "no-such-model"})
        assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"

        # the model's only node goes while another model's node stays: 503 (it may come back), not 404
        await embedded_env.node(1, model_name="smol-b")
        await mesh.wait_for_nodes(1, model="smol-b")
        embedded_env.nodes.remove(node)
        await node.aclose()
        await until(lambda: not mesh.nodes(MODEL), what="the router dropping the closed node")
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 503 and r.json()["error"]["code"] == "no_node_available"
        assert MODEL in r.json()["error"]["message"]
        assert (await http.post("/v1/completions", json={**body, "model": "no-such-model"})).status_code == 404
        health = await http.get("/health")
        assert health.status_code == 200 and health.json()["nodes"] == 1 and health.json()["models"] == ["smol-b"]


async def test_gateway_command_takes_api_keys_from_the_environment(embedded_env: MeshEnv, node_issuer: Key,
                                                                   tmp_path: Path) -> None:
    """`autoglm gateway` as a process: $AUTOGLM_API_KEYS is required on /v1, as for `autoglm serve`."""
    from sdk.identity.keystore import KdfParams, Keystore

    store = tmp_path / "keystore.json"
    Keystore.create(store, "pw", Key.generate(), kdf=KdfParams(opslimit=1, memlimit=64 * 1024))
    env = {**os.environ, "AUTOGLM_KEYSTORE": str(store), "AUTOGLM_PASSPHRASE": "pw",
           "AUTOGLM_API_KEYS": "sekret, second", "PYTHONUNBUFFERED": "1"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from sdk.cli import main; main()", "gateway", "--broker", embedded_env.url,
        "--node-trust", node_issuer.did, "--port", "0", "--log-level", "info",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env)
    assert proc.stderr is not None
    try:
        url = None
        seen = []
        async with asyncio.timeout(60):
            while url is None:
                line = (await proc.stderr.readline()).decode()
                assert line, "gateway exited: " + "".join(seen)
                seen.append(line)
                match = re.search(r"serving the OpenAI API on (http://\S+)/v1", line)
                url = match.group(1) if match else None
        drain = asyncio.create_task(proc.stderr.read())
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            missing = await http.get("/v1/models")
            assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
            wrong = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            for key in ("sekret", "second"):
                ok = await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
                assert ok.status_code == 200 and ok.json()["data"] == []
            health = await http.get("/health")  # outside /v1: no key, and no node yet
            assert health.status_code == 503 and health.json()["nodes"] == 0
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        await drain
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
