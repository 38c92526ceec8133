"""Reported properties: a small JSON object a device keeps up to date on the coordinator.

A device sends updates (``coord.properties`` ``{"properties": {...}}`` on its events topic); the
coordinator merges each into what it holds (a ``null`` value deletes the key), persists the
result and lets fleet queries filter on it (``where: {"reported": {...}}``). Both sides apply
the same bounds: a strict JSON object of at most :data:`MAX_BYTES` bytes, nested at most
:data:`MAX_DEPTH` deep, with at most :data:`MAX_KEYS` top-level keys, before and after merging.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sdk.coord.errors import CoordinationError
from sdk.identity.hazmat.json import value_problem

MAX_BYTES = 16 * 1024
MAX_DEPTH = 8
MAX_KEYS = 256
MAX_KEY = 256

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class InvalidProperties(CoordinationError, ValueError):
    """Reported properties that are not a bounded strict JSON object (``malformed`` / ``too_large``)."""

    reason = "malformed"


def size(properties: Mapping[str, Any]) -> int:
    """Bytes of ``properties`` as compact strict JSON."""
    try:
        return len(_encoder.encode(dict(properties)).encode())
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidProperties(f"properties are not strict JSON: {exc}") from exc


def check(properties: Any) -> dict[str, Any]:
    """``properties`` as a dict once it is within bounds (``null`` values allowed: they delete)."""
    if not isinstance(properties, dict):
        raise InvalidProperties("properties must be a JSON object")
    if len(properties) > MAX_KEYS:
        raise InvalidProperties(f"properties: at most {MAX_KEYS} keys, got {len(properties)}", reason="too_large")
    for key in properties:
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY:
            raise InvalidProperties(f"properties: keys are strings of 1-{MAX_KEY} characters")
    problem = value_problem(properties, max_depth=MAX_DEPTH)
    if problem is not None:
        raise InvalidProperties(f"properties: {problem}")
    if size(properties) > MAX_BYTES:
        raise InvalidProperties(f"properties exceed {MAX_BYTES} bytes", reason="too_large")
    return dict(properties)


def merge(current: Mapping[str, Any], update: Any) -> dict[str, Any]:
    """``current`` with ``update`` applied (``None`` deletes); the result must fit the bounds too."""
    out = dict(current)
    for key, value in check(update).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    if len(out) > MAX_KEYS or size(out) > MAX_BYTES:
        raise InvalidProperties(f"merged properties would exceed {MAX_BYTES} bytes / {MAX_KEYS} keys",
                                reason="too_large")
    return out


__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_KEYS", "InvalidProperties", "check", "merge", "size"]
