"""The assistant over a real mesh (router, node, broker, credentials) with the plugin's fake engine."""

from __future__ import annotations

from roomapp import Assistant

from sdk.identity import Key
from sdk.mesh import AccessPolicy, Mesh, MeshNode, NodeConfig, NodePolicy

QUESTION = "What is the code for the garage, tangerine-walrus-42?"


async def test_assistant_answers_through_the_mesh_and_the_broker_sees_no_plaintext(
        autoglm_broker, autoglm_issuer, autoglm_fake_engine, autoglm_sniffer):
    engine = autoglm_fake_engine
    model = engine.metadata["name"]
    node_key, app_key = Key.generate(), Key.generate()
    await autoglm_issuer.publish()                      # its status list: nodes and routers check it

    node = MeshNode(engine, autoglm_broker.url, key=node_key, access=AccessPolicy(autoglm_issuer.trust),
                    credential=autoglm_issuer.node(node_key, models=[model]),
                    config=NodeConfig(advert_interval=1.0), **autoglm_broker.credentials(node_key))
    router = Mesh(autoglm_broker.url, app_key, credentials=[autoglm_issuer.access(app_key, models=[model])],
                  node_policy=NodePolicy(autoglm_issuer.trust), **autoglm_broker.credentials(app_key))
    async with node, router:
        await router.wait_for_nodes(1, model=model, timeout=10)
        answer = await Assistant(router, model).answer(QUESTION)

    assert answer == engine.expected(Assistant.prompt(QUESTION))   # "Echo: Answer briefly. What is..."
    assert engine.requests[-1].max_new_tokens == 128
    assert autoglm_sniffer.on("autoglm/v1/inf/")                   # the request did cross the broker...
    assert not autoglm_sniffer.contains("tangerine-walrus-42")     # ...encrypted, prompt and answer alike


async def test_a_peer_without_access_is_refused(autoglm_broker, autoglm_issuer, autoglm_fake_engine):
    import pytest

    from sdk.mesh import NotPermitted

    model = autoglm_fake_engine.metadata["name"]
    node_key, stranger = Key.generate(), Key.generate()
    await autoglm_issuer.publish()
    node = MeshNode(autoglm_fake_engine, autoglm_broker.url, key=node_key,
                    access=AccessPolicy(autoglm_issuer.trust), credential=autoglm_issuer.node(node_key),
                    **autoglm_broker.credentials(node_key))
    router = Mesh(autoglm_broker.url, stranger, node_policy=NodePolicy(autoglm_issuer.trust),
                  **autoglm_broker.credentials(stranger))
    async with node, router:
        await router.wait_for_nodes(1, model=model, timeout=10)
        with pytest.raises(NotPermitted):
            await Assistant(router, model).answer("hello?")
    assert autoglm_fake_engine.requests == []
