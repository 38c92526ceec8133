"""The SDK's exception tree.

    AutoGLMError                      root of every error this SDK raises on purpose
    ├── IdentityError                 sdk.identity (keys, DIDs, credentials) — see sdk.identity.errors
    ├── MessagingError                sdk.coord transport/envelope layer — see sdk.messaging.errors
    ├── CoordinationError             coordinator / device SDK
    ├── InferenceError                sdk.inference engine — see sdk.inference.errors
    └── MeshError                     inference mesh (node, router, gateway)

Caller mistakes (wrong argument types or values) are plain ``TypeError``/``ValueError``;
security failures (bad signature, replay, revoked credential...) are subclasses of the
layer's error with a machine-readable ``reason`` string.
"""

from __future__ import annotations


class AutoGLMError(Exception):
    """Root of the SDK's exception tree."""

    #: Machine-readable reason code, stable across releases (e.g. ``"bad_signature"``).
    reason: str = "error"

    def __init__(self, message: str = "", *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class IdentityError(AutoGLMError):
    """Keys, DIDs, credentials and presentations."""

    reason = "identity_error"


class MessagingError(AutoGLMError):
    """MQTT transport, envelopes, request/response."""

    reason = "messaging_error"


class CoordinationError(AutoGLMError):
    """Coordinator daemon and device SDK."""

    reason = "coordination_error"


class InferenceError(AutoGLMError):
    """Inference engine and server."""

    reason = "inference_error"


class MeshError(AutoGLMError):
    """Inference mesh: nodes, router, gateway."""

    reason = "mesh_error"


__all__ = [
    "AutoGLMError",
    "IdentityError",
    "MessagingError",
    "CoordinationError",
    "InferenceError",
    "MeshError",
]
