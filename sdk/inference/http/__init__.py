"""The OpenAI-compatible HTTP front end (FastAPI): shared by ``autoglm serve`` and the mesh gateway.

Build it over any :class:`~sdk.inference.backend.GenerationBackend` with :func:`create_app`; run it
with :class:`sdk.inference.server.HTTPServer`.
"""

from __future__ import annotations

from sdk.inference.http.app import Admission, ClientDisconnected, create_app
from sdk.inference.http.errors import REASON_STATUS, APIError
from sdk.inference.http.metrics import Metrics

__all__ = ["create_app", "Admission", "ClientDisconnected", "APIError", "REASON_STATUS", "Metrics"]
