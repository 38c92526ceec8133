"""Open-AutoGLM SDK: DID identity, secure MQTT coordination and a shared inference core."""

from sdk.errors import (
    AutoGLMError,
    CoordinationError,
    IdentityError,
    InferenceError,
    MeshError,
    MessagingError,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "AutoGLMError",
    "IdentityError",
    "MessagingError",
    "CoordinationError",
    "InferenceError",
    "MeshError",
]
