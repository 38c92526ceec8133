"""Mesh fixtures: engines over the session SmolLM2, an access-credential issuer, nodes on a broker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from sdk.identity import Key, TrustPolicy
from sdk.mesh import (
    ACCESS_CREDENTIAL,
    AccessPolicy,
    Mesh,
    MeshNode,
    NodeConfig,
    RouterConfig,
    issue_access_credential,
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
def peer_key() -> Key:
    return Key.from_seed(bytes([62]) * 32)


@pytest.fixture(scope="session")
def access_vc(access_issuer: Key, peer_key: Key) -> Any:
    return issue_access_credential(access_issuer, peer_key.did, models=[MODEL], max_tokens=64)


class MeshEnv:
    """Nodes and routers on one broker; everything started is closed at teardown."""

    def __init__(self, url: str, credentials: Callable[[Key], dict[str, Any]], engines: list[Any],
                 trust: TrustPolicy) -> None:
        self.url, self.credentials, self.engines, self.trust = url, credentials, engines, trust
        self.nodes: list[MeshNode] = []
        self.routers: list[Mesh] = []

    async def node(self, index: int, *, access: AccessPolicy | None = None, **config: Any) -> MeshNode:
        key = Key.from_seed(bytes([100 + index]) * 32)
        config.setdefault("advert_interval", 1.0)
        node = MeshNode(self.engines[index], self.url, key=key, access=access or AccessPolicy(self.trust),
                        config=NodeConfig(node_id=f"node-{index}", **config), **self.credentials(key))
        await node.start()
        self.nodes.append(node)
        return node

    async def router(self, key: Key, credentials: list[Any] | tuple[Any, ...] = (), *, nodes: int = 1,
                     **config: Any) -> Mesh:
        mesh = Mesh(self.url, key, credentials=credentials, config=RouterConfig(**config), **self.credentials(key))
        await mesh.start()
        self.routers.append(mesh)
        if nodes:
            await mesh.wait_for_nodes(nodes, model=MODEL, timeout=10)
        return mesh

    async def close(self) -> None:
        for mesh in self.routers:
            await mesh.aclose()
        for node in self.nodes:
            await node.aclose()


@pytest.fixture
async def mesh_env(broker: Any, node_engines: list[Any], access_issuer: Key) -> AsyncIterator[MeshEnv]:
    """A MeshEnv on the parametrized broker (embedded amqtt and Mosquitto)."""
    env = MeshEnv(broker.url, broker.credentials, node_engines, TrustPolicy({access_issuer.did: {ACCESS_CREDENTIAL}}))
    try:
        yield env
    finally:
        await env.close()


@pytest.fixture
async def embedded_env(embedded_broker: Any, node_engines: list[Any], access_issuer: Key) -> AsyncIterator[MeshEnv]:
    """A MeshEnv on the embedded broker only (for tests that need no broker matrix)."""
    from sdk.messaging.broker_auth import did_credentials

    env = MeshEnv(embedded_broker.url, did_credentials, node_engines,
                  TrustPolicy({access_issuer.did: {ACCESS_CREDENTIAL}}))
    try:
        yield env
    finally:
        await env.close()
