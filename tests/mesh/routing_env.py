"""A mesh of FakeEngine nodes on a real broker, for the routing tests (no model, no torch)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sdk.identity import Key
from sdk.mesh import AccessPolicy, Mesh, MeshNode, NodeConfig, NodePolicy, RouterConfig
from sdk.testing import FakeEngine, TestIssuer
from sdk.testing.brokers import running_broker

MODEL = "fake-model"
PREFIX_KEY = b"routing-tests-prefix-key-32bytes"


class FakeMesh:
    """Nodes and routers over one broker, credentialed by one test issuer."""

    def __init__(self, broker: Any, issuer: TestIssuer) -> None:
        self.broker = broker
        self.issuer = issuer
        self.nodes: list[MeshNode] = []
        self.routers: list[Mesh] = []

    async def node(self, engine: FakeEngine | None = None, *, node_id: str | None = None, **config: Any) -> MeshNode:
        """Start a node for ``engine`` (default a FakeEngine); ``config``: NodeConfig fields."""
        engine = engine or FakeEngine()
        key = Key.generate()
        config.setdefault("advert_interval", 0.5)
        node = MeshNode(engine, self.broker.url, key=key, access=AccessPolicy(self.issuer.trust),
                        credential=self.issuer.node(key, models=[MODEL]),
                        config=NodeConfig(node_id=node_id, **config), **self.broker.credentials(key))
        await node.start()
        self.nodes.append(node)
        return node

    async def router(self, config: RouterConfig = RouterConfig(), **options: Any) -> Mesh:
        key = Key.generate()
        mesh = Mesh(self.broker.url, key, credentials=[self.issuer.access(key)], node_policy=NodePolicy(self.issuer.trust),
                    config=config, **options, **self.broker.credentials(key))
        await mesh.start()
        self.routers.append(mesh)
        return mesh

    async def aclose(self) -> None:
        for mesh in self.routers:
            await mesh.aclose()
        for node in self.nodes:
            await node.aclose()
        await self.issuer.aclose()


@asynccontextmanager
async def fake_mesh(kind: str) -> AsyncIterator[FakeMesh]:
    """A broker of ``kind`` with the issuer's status list published, and a :class:`FakeMesh` on it."""
    issuer = TestIssuer()
    async with running_broker(kind) as broker:
        issuer.bind(broker.url, broker.credentials(issuer.key))
        await issuer.publish()
        env = FakeMesh(broker, issuer)
        try:
            yield env
        finally:
            await env.aclose()
