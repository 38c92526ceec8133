"""Who may be a node: routers use only nodes with a verifiable, unrevoked InferenceNodeCredential."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from sdk.identity import Key
from sdk.inference import GenerationRequest
from sdk.mesh import NodeAdvert, NoNode, issue_node_credential
from sdk.mesh import topics as mesh_topics
from sdk.mesh.adverts import NodeLoad
from sdk.mesh.protocol import ADVERT
from sdk.messaging.envelope import Message
from sdk.messaging.topics import client_token
from tests.fixtures.waiting import until
from tests.mesh.conftest import MODEL, MeshEnv

pytestmark = [pytest.mark.model, pytest.mark.broker]


def tiny() -> GenerationRequest:
    return GenerationRequest(prompt="Hello", max_new_tokens=2, temperature=0.0)


class Impostor:
    """A DID that advertises a very fast node and records every request that reaches it."""

    def __init__(self, client: Any, node_id: str | None = None) -> None:
        self.client = client
        self.node_id = node_id or client_token(client.did)
        self.requests: list[Message] = []

    async def start(self) -> Impostor:
        async def steal(msg: Message) -> Any:
            self.requests.append(msg)
            return {"t": "pwned", "ids": [1], "f": "stop"}

        await self.client.serve(mesh_topics.inference_requests(self.node_id), steal)
        return self

    async def advertise(self, *, epoch: float | None = None, credentials: list[Any] | None = None) -> None:
        advert = NodeAdvert(node_id=self.node_id, did=self.client.did, epoch=epoch or time.time(), seq=1,
                            models=(MODEL,), load=NodeLoad(max_batch_size=64, tokens_per_s=1e6), interval_s=1.0)
        await self.client.publish(mesh_topics.inference_ad(self.node_id), advert.to_body(), type=ADVERT,
                                  retain=True, ttl=30, credentials=credentials)


async def test_uncredentialed_nodes_get_no_traffic(mesh_env: MeshEnv, peer_key: Key, access_vc: Any) -> None:
    good = await mesh_env.node(0)
    mesh = await mesh_env.router(peer_key, [access_vc])
    impostors = []
    for credentials in (
        None,  # no credential at all
        lambda did: [issue_node_credential(Key.generate(), did, models=[MODEL])],  # an untrusted issuer
        lambda did: [issue_node_credential(mesh_env.node_issuer, did, models=["other-model"])],  # another model
        lambda did: [issue_node_credential(mesh_env.node_issuer, Key.generate().did, models=[MODEL])],  # not theirs
    ):
        impostor = await Impostor(await mesh_env.client(Key.generate())).start()
        rejected = mesh.counters["adverts_rejected"]
        await impostor.advertise(credentials=credentials(impostor.client.did) if credentials else None)
        await until(lambda r=rejected: mesh.counters["adverts_rejected"] > r, what="advert rejection")  # type: ignore[misc]
        impostors.append(impostor)
    for _ in range(3):
        await mesh.generate(tiny())
    assert good.served == 3
    assert [n.node_id for n in mesh.nodes()] == [good.node_id]
    assert all(i.requests == [] for i in impostors)  # no prompt reached any of them


async def test_other_did_cannot_take_over_a_node_id(embedded_env: MeshEnv, peer_key: Key, access_vc: Any) -> None:
    node = await embedded_env.node(0)
    mesh = await embedded_env.router(peer_key, [access_vc])
    # credentialed for the model, but node-0 is not its id
    thief = await Impostor(await embedded_env.client(Key.generate()), node.node_id).start()
    # credentialed even for the id node-0 (say, a machine's replacement): still not while node-0 lives
    heir = await Impostor(await embedded_env.client(Key.generate()), node.node_id).start()
    for impostor, ids in ((thief, []), (heir, [node.node_id])):
        cred = issue_node_credential(embedded_env.node_issuer, impostor.client.did, models=[MODEL], node_ids=ids)
        rejected = mesh.counters["adverts_rejected"]
        await impostor.advertise(epoch=node.epoch + 1000, credentials=[cred])
        await until(lambda r=rejected: mesh.counters["adverts_rejected"] > r, what="advert rejection")  # type: ignore[misc]
    held = mesh.table.get(node.node_id)
    assert held is not None and held.did == node.did
    await mesh.generate(tiny())
    assert node.served == 1
    assert thief.requests == [] and heir.requests == []


async def test_revoked_node_is_dropped_at_once(mesh_env: MeshEnv, peer_key: Key, access_vc: Any) -> None:
    status = mesh_env.status_list(mesh_env.node_issuer)
    await status.publish()
    key = Key.from_seed(bytes([100]) * 32)
    cred = mesh_env.node_credential(key, "node-0", credential_status=status.entry(5))
    node = await mesh_env.node(0, key=key, credential=cred)
    mesh = await mesh_env.router(peer_key, [access_vc])
    await mesh.generate(tiny())
    assert node.served == 1

    await status.publish(5)
    took = await until(lambda: not mesh.nodes(), timeout=5, what="revoked node dropped")
    assert took < 2.0, f"revoked node still routed to {took:.2f}s after the new status list"
    assert mesh.counters["nodes_revoked"] == 1
    rejected = mesh.counters["adverts_rejected"]
    await until(lambda: mesh.counters["adverts_rejected"] > rejected, what="the revoked node's next advert refused")
    assert mesh.nodes() == []
    with pytest.raises(NoNode):
        await mesh.generate(tiny())
    assert node.served == 1


async def test_expired_node_credential_gets_no_more_traffic(embedded_env: MeshEnv, peer_key: Key,
                                                            access_vc: Any) -> None:
    from sdk.mesh import NodePolicy

    key = Key.from_seed(bytes([100]) * 32)
    cred = embedded_env.node_credential(key, "node-0", valid_for=3)
    node = await embedded_env.node(0, key=key, credential=cred)
    mesh = await embedded_env.router(peer_key, [access_vc], node_policy=NodePolicy(embedded_env.node_trust, skew=0))
    await mesh.generate(tiny())
    expires = datetime.strptime(cred["validUntil"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    await until(lambda: time.time() > expires + 0.05, timeout=5, what="the credential's expiry")
    with pytest.raises(NoNode):  # dropped before any prompt goes to it, not after it goes stale
        await mesh.generate(tiny())
    assert node.served == 1
