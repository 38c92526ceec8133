"""OpenAI-shaped error bodies, and the mapping from the SDK's error reasons to HTTP statuses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sdk.errors import AutoGLMError, InferenceError

#: HTTP status, OpenAI error ``type`` and ``code`` for each stable ``reason`` a backend may raise.
#: Reasons not listed here are internal errors (500). Callers of ``create_app`` may extend it.
REASON_STATUS: Mapping[str, tuple[int, str, str | None]] = {
    "prompt_too_long": (400, "invalid_request_error", "context_length_exceeded"),
    "invalid_request": (400, "invalid_request_error", None),
    "invalid_schema": (400, "invalid_request_error", "invalid_schema"),
    "schema_too_large": (400, "invalid_request_error", "schema_too_large"),
    "unsupported_schema": (400, "invalid_request_error", "unsupported_schema"),
    "structured_output_unavailable": (501, "not_implemented", "structured_output_unavailable"),
    "model_not_found": (404, "invalid_request_error", "model_not_found"),
    "overloaded": (429, "server_overloaded", "server_overloaded"),
    "queue_full": (429, "server_overloaded", "server_overloaded"),
    "shutting_down": (503, "service_unavailable", "service_unavailable"),
    "not_ready": (503, "service_unavailable", "service_unavailable"),
    "unavailable": (503, "service_unavailable", "service_unavailable"),
    "no_route": (503, "service_unavailable", "service_unavailable"),
    "timeout": (504, "timeout", "timeout"),
}


#: The OpenAI parameter behind each ``GenerationRequest`` field an ``InvalidRequest`` names.
REQUEST_PARAMS: Mapping[str, str] = {"max_new_tokens": "max_tokens", "prompt_token_ids": "prompt"}


def param_of_field(field: str | None) -> str | None:
    """The OpenAI request parameter for a ``GenerationRequest`` field name."""
    return None if field is None else REQUEST_PARAMS.get(field, field)


class APIError(InferenceError):
    """An error the HTTP layer answers with an OpenAI-shaped body and a given status."""

    reason = "api_error"

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # noqa: A002 - OpenAI's error field name
        param: str | None = None,
        code: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason or code or type)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    """A 400 ``invalid_request_error``."""
    return APIError(400, message, param=param, code=code, reason="invalid_request")


def from_sdk_error(
    exc: AutoGLMError, *, table: Mapping[str, tuple[int, str, str | None]] = REASON_STATUS
) -> APIError:
    """Map a typed SDK error to the HTTP error its ``reason`` calls for (500 if unknown)."""
    if isinstance(exc, APIError):
        return exc
    status, type_, code = table.get(exc.reason, (500, "internal_error", "internal_error"))
    message = str(exc) if status < 500 or exc.reason in table else "internal error"
    field = getattr(exc, "field", None)
    param = param_of_field(field) if isinstance(field, str) and status < 500 else None
    return APIError(status, message or exc.reason, type=type_, param=param, code=code, reason=exc.reason)


__all__ = ["REASON_STATUS", "REQUEST_PARAMS", "APIError", "bad_request", "from_sdk_error", "param_of_field"]
