"""``autoglm gateway``: the OpenAI-compatible HTTP app (the same one ``autoglm serve`` runs) with a
:class:`~sdk.mesh.router.Mesh` as its backend, so OpenAI clients use the mesh unchanged.

The mesh's errors map to HTTP: ``no_node`` → 503, ``not_permitted`` → 403, ``overloaded`` → 429,
``timeout`` → 504, a node's ``invalid_request`` / ``prompt_too_long`` → 400. ``no_capable_node``
(nodes serve the model, but none advertises the constrained output or tools the request needs)
→ 503 with that code: the request is valid and the mesh cannot serve it *now*; it succeeds as
soon as a node that lists the feature is live again (a rolling upgrade, a node restarting with
the grammar library), so clients may retry, as for ``no_node_available``. A 400 would tell them
the request itself is wrong and never to send it again.

A model no live node serves is 503 ``no_node_available`` (retry later: its nodes may come back),
except while some node is live and the gateway has never seen that model advertised (it notes the
live nodes' models on every listing, request and health check): that is the usual 404
``model_not_found``. ``/health`` is 503 ``{"status": "unavailable",
"nodes": 0}`` while no node is live, and ``ok`` with the node count otherwise. API keys are
required as for ``autoglm serve`` (``--api-key`` and ``$AUTOGLM_API_KEYS``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection, Mapping
from typing import TYPE_CHECKING, Any

from sdk.identity import Key
from sdk.inference.types import GenerationRequest, GenerationResult, TokenChunk
from sdk.mesh.router import Mesh, RouterConfig

if TYPE_CHECKING:
    from sdk.inference.http.errors import APIError

log = logging.getLogger(__name__)

#: The HTTP error code when no live node serves the requested model.
NO_NODE_CODE = "no_node_available"

#: reason → (HTTP status, OpenAI error type, code) for the mesh's errors (the app knows the rest).
MESH_ERROR_STATUSES: Mapping[str, tuple[int, str, str | None]] = {
    "no_node": (503, "service_unavailable", NO_NODE_CODE),
    "not_permitted": (403, "permission_error", "not_permitted"),
    "node_lost": (503, "service_unavailable", NO_NODE_CODE),
    "no_capable_node": (503, "service_unavailable", "no_capable_node"),
}


class GatewayBackend:
    """The mesh as the HTTP app's backend; remembers every model a live node advertised, so a
    model whose nodes are gone is told apart from one the mesh never had."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.seen: set[str] = set()

    def stream(self, req: GenerationRequest, /) -> AsyncIterator[TokenChunk]:
        """The mesh's token stream (routing, failover)."""
        return self.mesh.stream(req)

    async def generate(self, req: GenerationRequest, /) -> GenerationResult:
        """The whole result over the mesh."""
        return await self.mesh.generate(req)

    def models(self) -> list[dict[str, Any]]:
        """The models live nodes serve now (each noted as seen)."""
        docs = self.mesh.models()
        self.seen.update(str(d.get("name")) for d in docs)
        return docs

    def stats(self) -> dict[str, Any]:
        """Router counters and the mesh's aggregate load."""
        return self.mesh.stats()

    def live_nodes(self) -> int:
        """How many nodes have a fresh advert."""
        nodes = self.mesh.nodes()
        self.seen.update(m for a in nodes for m in a.models)
        return len(nodes)

    def missing_model(self, requested: str) -> APIError | None:
        """503 ``no_node_available`` unless nodes are live and ``requested`` was never advertised
        (None: the app's 404)."""
        from sdk.inference.http.errors import APIError

        live = self.live_nodes()
        if live and requested not in self.seen:
            return None
        message = (f"no live node serves the model '{requested}'; retry when one advertises it" if live
                   else "no inference node is live on the mesh; retry when one advertises")
        log.info("gateway: %s", message)
        return APIError(503, message, type="service_unavailable", param="model", code=NO_NODE_CODE,
                        reason="no_node")

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """``/health``: ready while at least one node is live; reports the count."""
        live = self.live_nodes()
        return live > 0, {"nodes": live}


def create_gateway_app(mesh: Mesh, *, served_model_name: str | None = None, max_concurrent: int = 64,
                       max_queued: int = 256, api_keys: Collection[str] | None = None) -> Any:
    """The OpenAI FastAPI app over ``mesh`` (``/v1/models`` lists the models live nodes advertise)."""
    from sdk.inference.http.app import create_app

    backend = GatewayBackend(mesh)
    return create_app(backend, served_model_name=served_model_name, max_concurrent=max_concurrent,
                      max_queued=max_queued, api_keys=api_keys, error_statuses=MESH_ERROR_STATUSES,
                      missing_model=backend.missing_model, readiness=backend.readiness)


async def run_gateway(
    broker: Any,
    key: Key,
    *,
    credentials: list[Any] | tuple[Any, ...] = (),
    node_policy: Any = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    config: RouterConfig = RouterConfig(),
    default_model: str | None = None,
    api_keys: Collection[str] | None = None,
    max_concurrent: int = 64,
    log_level: str = "info",
    policy_trust: Any = None,
) -> None:
    """Join the mesh as a permitted peer and serve the OpenAI API until SIGINT/SIGTERM
    (``node_policy``: which nodes to use, ``policy_trust``: whose routing policies to follow, see
    :class:`~sdk.mesh.Mesh`; ``api_keys``: see
    :func:`sdk.inference.server.api_keys_from`)."""
    from sdk.inference.server import HTTPServer

    async with Mesh(broker, key, credentials=credentials, node_policy=node_policy, config=config,
                    default_model=default_model, policy_trust=policy_trust) as mesh:
        app = create_gateway_app(mesh, max_concurrent=max_concurrent, api_keys=api_keys)
        server = HTTPServer(app, host=host, port=port, log_level=log_level, handle_signals=True)
        await server.start()
        log.info("mesh gateway for %s on %s (%s)", key.did, server.url,
                 "API keys required" if api_keys else "no API key required")
        try:
            await server.wait()
        finally:
            await server.stop()


__all__ = ["create_gateway_app", "run_gateway", "GatewayBackend", "MESH_ERROR_STATUSES", "NO_NODE_CODE"]
