"""Errors of the inference engine; each carries a stable ``reason`` the HTTP layer maps to a status.

    InferenceError (sdk.errors)
    ├── InvalidRequest     reason "invalid_request"   bad request fields (400)
    ├── PromptTooLong      reason "prompt_too_long"   no room left in max_sequence_length (400)
    ├── InvalidConfig      reason "invalid_config"    an engine setting beyond the model's limit
    ├── EngineOverloaded   reason "overloaded"        the waiting queue is full (429/503)
    └── EngineClosed       reason "shutting_down"     the engine is closed or closing (503)
"""

from __future__ import annotations

from sdk.errors import InferenceError


class InvalidRequest(InferenceError):
    """A generation request with missing, conflicting or out-of-range fields.

    ``field`` names the offending request field (``None`` when the problem spans fields).
    """

    reason = "invalid_request"

    def __init__(self, message: str = "", *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class PromptTooLong(InferenceError):
    """The prompt cannot fit, with at least one new token, in ``max_sequence_length``."""

    reason = "prompt_too_long"

    def __init__(self, message: str = "", *, prompt_tokens: int = 0, max_sequence_length: int = 0) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.max_sequence_length = max_sequence_length


class InvalidConfig(InferenceError):
    """An engine setting the model cannot take (``max_sequence_length`` above its context length):
    ``field`` names the setting, ``limit`` the largest value allowed."""

    reason = "invalid_config"

    def __init__(self, message: str = "", *, field: str, limit: int | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.limit = limit


class EngineOverloaded(InferenceError):
    """Too many requests are already waiting for a slot; retry later."""

    reason = "overloaded"


class EngineClosed(InferenceError):
    """The engine was closed (or is closing) and takes no more requests."""

    reason = "shutting_down"


__all__ = ["InferenceError", "InvalidRequest", "InvalidConfig", "PromptTooLong", "EngineOverloaded", "EngineClosed"]
