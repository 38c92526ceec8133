"""Strict JSON parsing for signed and untrusted documents.

``loads`` rejects duplicate object members (one signed document, one meaning), NaN and
±Infinity (numbers are finite), documents over ``max_bytes`` and nesting deeper than
``max_depth``, all before or during the one parse. Errors are ``ValueError``.
"""

from __future__ import annotations

import json as _json
import math
from typing import Any

DEFAULT_MAX_BYTES = 1024 * 1024
DEFAULT_MAX_DEPTH = 64

dumps_compact = _json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise ValueError(f"duplicate JSON member {dup[:64]!r}")
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} in JSON")


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e999 parses to inf
        raise ValueError("non-finite number in JSON")
    return value


# One decoder for every call: json.loads(**hooks) would build a JSONDecoder and its scanner per document.
_DECODER = _json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant, parse_float=_float)
_decode = _DECODER.decode


def _depth_ok(text: str | bytes, max_depth: int) -> bool:
    """Cheap scan: nesting of brackets outside strings never exceeds ``max_depth``."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    if text.count("[") + text.count("{") <= max_depth:
        return True
    depth = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def loads(
    text: str | bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_depth: int | None = DEFAULT_MAX_DEPTH
) -> Any:
    """Parse ``text`` strictly (see module docstring); ``ValueError`` on any violation.

    ``max_depth=None`` skips the depth scan (the C parser's recursion guard still applies).
    """
    if not isinstance(text, (str, bytes, bytearray)):
        raise ValueError(f"JSON must be str or bytes, not {type(text).__name__}")
    if len(text) > max_bytes:
        raise ValueError(f"JSON document over {max_bytes} bytes")
    if max_depth is not None and not _depth_ok(text, max_depth):
        raise ValueError(f"JSON nested deeper than {max_depth}")
    try:
        if isinstance(text, str):  # what json.loads does before decoding, without a decoder per call
            if text.startswith("\ufeff"):
                raise _json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        else:
            text = text.decode(_json.detect_encoding(text), "surrogatepass")
        return _decode(text)
    except RecursionError as exc:  # pragma: no cover - bounded by the depth scan
        raise ValueError("JSON nested too deeply") from exc
    except UnicodeDecodeError as exc:
        raise ValueError("JSON is not UTF-8") from exc


def value_problem(value: object, *, max_depth: int = DEFAULT_MAX_DEPTH) -> str | None:
    """Why an in-memory ``value`` is not plain JSON (finite numbers, string keys, nesting at most
    ``max_depth``), or None when it is: for values built in code before they are signed."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if item is None or isinstance(item, (str, bool, int)):
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return f"non-finite number {item!r}"
        elif depth >= max_depth:
            return f"nested deeper than {max_depth}"
        elif isinstance(item, dict):
            bad = next((k for k in item if not isinstance(k, str)), None)
            if bad is not None:
                return f"non-string key {bad!r}"
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
        else:
            return f"{type(item).__name__} is not a JSON value"
    return None


__all__ = ["loads", "dumps_compact", "value_problem", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_DEPTH"]
