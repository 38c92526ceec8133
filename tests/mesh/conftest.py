"""Mesh fixtures: engines over the session SmolLM2, access- and node-credential issuers, nodes on a broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from sdk.identity import Key, StatusList, TrustPolicy, create_status_list_credential, status_entry
from sdk.mesh import (
    ACCESS_CREDENTIAL,
    NODE_CREDENTIAL,
    AccessPolicy,
    Mesh,
    MeshNode,
    NodeConfig,
    NodePolicy,
    RouterConfig,
    issue_access_credential,
    issue_node_credential,
)

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def node_engines(make_engine: Callable[..., Any]) -> list[Any]:
    """Three engines sharing the session model (each its own slots and scheduler thread)."""
    return [make_engine(max_batch_size=4) for _ in range(3)]


@pytest.fixture(scope="session")
def access_issuer() -> Key:
    return Key.from_seed(bytes([61]) * 32)


@pytest.fixture(scope="session")
def node_issuer() -> Key:
    """Issues the nodes' InferenceNodeCredentials (routers trust it for that type only)."""
    return Key.from_seed(bytes([63]) * 32)


@pytest.fixture(scope="session")
def peer_key() -> Key:
    return Key.from_seed(bytes([62]) * 32)


@pytest.fixture(scope="session")
def access_vc(access_issuer: Key, peer_key: Key) -> Any:
    return issue_access_credential(access_issuer, peer_key.did, models=[MODEL], max_tokens=64)




class LiveStatusList:
    """An issuer's status list published over MQTT (retained, ``validFrom`` rising with each list)."""

    def __init__(self, env: MeshEnv, issuer: Key) -> None:
        from sdk.messaging.status import status_list_url

        self.env, self.issuer = env, issuer
        self.url = status_list_url(issuer.did)
        self.bits = StatusList()
        self._base = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=120)
        self._n = 0
        self._client: Any = None

    def entry(self, index: int) -> dict[str, Any]:
        return status_entry(self.url, index)

    async def publish(self, *revoke: int) -> None:
        """Set ``revoke``'s bits, then sign and publish the list (connecting as the issuer once)."""
        from sdk.messaging import SecureClient
        from sdk.messaging.status import publish_status_list

        for index in revoke:
            self.bits.set(index)
        if self._client is None:
            self._client = SecureClient(self.env.url, self.issuer, **self.env.credentials(self.issuer))
            await self._client.connect()
            self.env.clients.append(self._client)
        self._n += 1
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        cred = create_status_list_credential(
            self.issuer, self.url, status_list=self.bits,
            valid_from=(self._base + timedelta(seconds=self._n)).strftime(fmt),
            valid_until=(self._base + timedelta(hours=2)).strftime(fmt))
        assert isinstance(cred, dict)
        await publish_status_list(self._client, cred)


class MeshEnv:
    """Nodes and routers on one broker; everything started is closed at teardown."""

    def __init__(self, url: str, credentials: Callable[[Key], dict[str, Any]], engines: list[Any],
                 trust: TrustPolicy, node_issuer: Key) -> None:
        self.url, self.credentials, self.engines, self.trust = url, credentials, engines, trust
        self.node_issuer = node_issuer
        self.node_trust = TrustPolicy({node_issuer.did: {NODE_CREDENTIAL}})
        self.nodes: list[MeshNode] = []
        self.routers: list[Mesh] = []
        self.clients: list[Any] = []  # other SecureClients to close

    def node_credential(self, key: Key, node_id: str, model: str = MODEL, **options: Any) -> Any:
        return issue_node_credential(self.node_issuer, key.did, models=[model], node_ids=[node_id], **options)

    async def node(self, index: int, *, access: AccessPolicy | None = None, key: Key | None = None,
                   credential: Any = None, **config: Any) -> MeshNode:
        key = key or Key.from_seed(bytes([100 + index]) * 32)
        config.setdefault("advert_interval", 1.0)
        node_id = config.pop("node_id", f"node-{index}")
        if credential is None:
            credential = self.node_credential(key, node_id, config.get("model_name") or MODEL)
        node = MeshNode(self.engines[index], self.url, key=key, access=access or AccessPolicy(self.trust),
                        credential=credential, config=NodeConfig(node_id=node_id, **config), **self.credentials(key))
        await node.start()
        self.nodes.append(node)
        return node

    async def router(self, key: Key, credentials: list[Any] | tuple[Any, ...] = (), *, nodes: int = 1,
                     node_policy: NodePolicy | None = None, **config: Any) -> Mesh:
        mesh = Mesh(self.url, key, credentials=credentials, node_policy=node_policy or NodePolicy(self.node_trust),
                    config=RouterConfig(**config), **self.credentials(key))
        await mesh.start()
        self.routers.append(mesh)
        if nodes:
            await mesh.wait_for_nodes(nodes, model=MODEL, timeout=10)
        return mesh

    def status_list(self, issuer: Key) -> LiveStatusList:
        return LiveStatusList(self, issuer)

    async def client(self, key: Key) -> Any:
        """A connected SecureClient (closed at teardown)."""
        from sdk.messaging import SecureClient

        client = SecureClient(self.url, key, **self.credentials(key))
        await client.connect()
        self.clients.append(client)
        return client

    async def close(self) -> None:
        for mesh in self.routers:
            await mesh.aclose()
        for node in self.nodes:
            await node.aclose()
        for client in self.clients:
            await client.aclose()


@pytest.fixture
async def mesh_env(broker: Any, node_engines: list[Any], access_issuer: Key,
                   node_issuer: Key) -> AsyncIterator[MeshEnv]:
    """A MeshEnv on the parametrized broker (embedded amqtt and Mosquitto)."""
    env = MeshEnv(broker.url, broker.credentials, node_engines, TrustPolicy({access_issuer.did: {ACCESS_CREDENTIAL}}),
                  node_issuer)
    try:
        yield env
    finally:
        await env.close()


@pytest.fixture
async def embedded_env(embedded_broker: Any, node_engines: list[Any], access_issuer: Key,
                       node_issuer: Key) -> AsyncIterator[MeshEnv]:
    """A MeshEnv on the embedded broker only (for tests that need no broker matrix)."""
    from sdk.messaging.broker_auth import did_credentials

    env = MeshEnv(embedded_broker.url, did_credentials, node_engines,
                  TrustPolicy({access_issuer.did: {ACCESS_CREDENTIAL}}), node_issuer)
    try:
        yield env
    finally:
        await env.close()
