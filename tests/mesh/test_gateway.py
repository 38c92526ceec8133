"""The OpenAI gateway: the official ``openai`` client talks to the mesh through the same HTTP app."""

from __future__ import annotations

from typing import Any

import openai
import pytest

from sdk.identity import Key
from sdk.inference import GenerationRequest
from sdk.inference.server import HTTPServer
from sdk.mesh import issue_access_credential
from sdk.mesh.gateway import create_gateway_app
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
