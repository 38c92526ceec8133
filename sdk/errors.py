"""The SDK's exception tree.

    AutoGLMError                      root of every error this SDK raises on purpose
    ├── IdentityError                 sdk.identity (keys, DIDs, credentials) — see sdk.identity.errors
    ├── MessagingError                sdk.messaging (transport, envelope, client) — see sdk.messaging.errors
    ├── CoordinationError             sdk.coord (coordinator daemon, device SDK)
    ├── InferenceError                sdk.inference engine and HTTP app — see sdk.inference.errors
    ├── MeshError                     sdk.mesh (node, router, gateway)
    └── MissingExtra                  an optional dependency is not installed (also an ImportError)

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


class MissingExtra(AutoGLMError, ImportError):
    """A feature needs an optional dependency that is not installed; the message names the extra."""

    reason = "missing_extra"

    def __init__(self, module: str, extra: str, *, feature: str | None = None) -> None:
        what = feature or "this feature"
        super().__init__(
            f"{what} needs {module!r}, which is not installed: pip install 'open-autoglm-sdk[{extra}]'"
        )
        self.module = module
        self.extra = extra


def require_extra(exc: ModuleNotFoundError, extra: str, *, feature: str | None = None) -> MissingExtra:
    """The :class:`MissingExtra` for a failed import: ``raise require_extra(exc, "cli") from exc``."""
    return MissingExtra((exc.name or "?").partition(".")[0], extra, feature=feature)


__all__ = [
    "MissingExtra",
    "require_extra",
    "AutoGLMError",
    "IdentityError",
    "MessagingError",
    "CoordinationError",
    "InferenceError",
    "MeshError",
]
