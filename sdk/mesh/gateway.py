"""``autoglm gateway``: the OpenAI-compatible HTTP app (the same one ``autoglm serve`` runs) with a
:class:`~sdk.mesh.router.Mesh` as its backend, so OpenAI clients use the mesh unchanged.

The mesh's errors map to HTTP: ``no_node`` → 503, ``not_permitted`` → 403, ``overloaded`` → 429,
``timeout`` → 504, a node's ``invalid_request`` / ``prompt_too_long`` → 400.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

from sdk.identity import Key
from sdk.mesh.router import Mesh, RouterConfig

log = logging.getLogger(__name__)

#: reason → (HTTP status, OpenAI error type, code) for the mesh's errors (the app knows the rest).
MESH_ERROR_STATUSES: Mapping[str, tuple[int, str, str | None]] = {
    "no_node": (503, "service_unavailable", "no_node"),
    "not_permitted": (403, "permission_error", "not_permitted"),
    "node_lost": (503, "service_unavailable", "no_node"),
}


def create_gateway_app(mesh: Mesh, *, served_model_name: str | None = None, max_concurrent: int = 64,
                       max_queued: int = 256, api_keys: Collection[str] | None = None) -> Any:
    """The OpenAI FastAPI app over ``mesh`` (``/v1/models`` lists the models live nodes advertise)."""
    from sdk.inference.http.app import create_app

    return create_app(mesh, served_model_name=served_model_name, max_concurrent=max_concurrent,
                      max_queued=max_queued, api_keys=api_keys, error_statuses=MESH_ERROR_STATUSES)


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
) -> None:
    """Join the mesh as a permitted peer and serve the OpenAI API until SIGINT/SIGTERM
    (``node_policy``: which nodes to use, see :class:`~sdk.mesh.Mesh`)."""
    from sdk.inference.server import HTTPServer

    async with Mesh(broker, key, credentials=credentials, node_policy=node_policy, config=config,
                    default_model=default_model) as mesh:
        app = create_gateway_app(mesh, max_concurrent=max_concurrent, api_keys=api_keys)
        server = HTTPServer(app, host=host, port=port, log_level=log_level, handle_signals=True)
        await server.start()
        log.info("mesh gateway for %s on %s", key.did, server.url)
        try:
            await server.wait()
        finally:
            await server.stop()


__all__ = ["create_gateway_app", "run_gateway", "MESH_ERROR_STATUSES"]
