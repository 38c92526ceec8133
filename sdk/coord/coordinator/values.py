"""Numbers and JSON values at the coordinator's boundary: finite, in range, serialisable.

Whatever reaches the store or a signed config passes through here, whatever its source (a
device message, a rule's templated output, the TOML configuration): a NaN that is stored can
never be signed again, and an infinite TTL never expires.
"""

from __future__ import annotations

import json
import math
from typing import Any

from sdk.coord.coordinator.errors import InvalidValue
from sdk.identity.hazmat.json import value_problem

#: The largest integer a version or counter may take (exact in JSON doubles and SQLite).
MAX_INT = 2**53 - 1
#: Nesting allowed in attributes, event fields and config values.
MAX_DEPTH = 16

_strict = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_strict_sorted = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, sort_keys=True)


def strict_dumps(value: Any, *, sort_keys: bool = False) -> str:
    """Compact JSON with no NaN/Infinity; raises :class:`InvalidValue` for anything else unserialisable."""
    try:
        return (_strict_sorted if sort_keys else _strict).encode(value)
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidValue(f"not serialisable as strict JSON: {exc}") from exc


def finite(value: Any, *, what: str, minimum: float | None = None, maximum: float | None = None) -> float:
    """``value`` as a finite float within ``[minimum, maximum]``; raises :class:`InvalidValue`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidValue(f"{what} must be a number, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError as exc:            # an int too large for a double
        raise InvalidValue(f"{what} is out of range") from exc
    if not math.isfinite(number):
        raise InvalidValue(f"{what} must be finite, got {value!r}")
    if minimum is not None and number < minimum:
        raise InvalidValue(f"{what} must be >= {minimum}, got {value!r}")
    if maximum is not None and number > maximum:
        raise InvalidValue(f"{what} must be <= {maximum}, got {value!r}")
    return number


def integer(value: Any, *, what: str, minimum: int = 0, maximum: int = MAX_INT) -> int:
    """``value`` as an int within ``[minimum, maximum]`` (booleans are not integers)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidValue(f"{what} must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise InvalidValue(f"{what} must be between {minimum} and {maximum}")
    return value


def check_json(value: Any, *, what: str, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`InvalidValue` unless ``value`` is plain JSON: finite numbers, string keys,
    nesting at most ``max_depth``."""
    problem = value_problem(value, max_depth=max_depth)
    if problem is not None:
        raise InvalidValue(f"{what}: {problem}")


__all__ = ["MAX_INT", "MAX_DEPTH", "strict_dumps", "finite", "integer", "check_json"]
