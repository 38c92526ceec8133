"""Low level: RFC 8785 JSON Canonicalization Scheme (JCS).

Objects sorted by the UTF-16 code units of their keys, no whitespace, strings escaped as
ECMAScript ``JSON.stringify`` does, numbers serialized as ECMAScript ``Number.prototype.toString``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

# C-accelerated JSON string quoting (escapes '"', '\\' and U+0000..U+001F exactly like ES).
_quote = json.encoder.encode_basestring

_MAX_SAFE_INT = 2**53


def _utf16_key(s: str) -> bytes:
    return s.encode("utf-16-be", "surrogatepass")


def format_number(value: float | int) -> str:
    """Serialize a number as ECMAScript ``Number.prototype.toString`` (RFC 8785 §3.2.2.3)."""
    if isinstance(value, bool):
        raise ValueError("booleans are not numbers")
    if isinstance(value, int):
        if -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT:
            return str(value)
        try:
            value = float(value)
        except OverflowError:
            raise ValueError(f"integer {value} is outside the IEEE-754 double range") from None
    if not isinstance(value, float):
        raise ValueError(f"not a JSON number: {value!r}")
    if not math.isfinite(value):
        raise ValueError("NaN and Infinity are not allowed in JSON")
    if value == 0:
        return "0"  # also -0
    sign = "-" if value < 0 else ""
    # repr() gives the shortest digit string that round-trips, like ECMAScript.
    mant, _, exp = repr(abs(value)).partition("e")
    ip, _, fp = mant.partition(".")
    if fp == "0":
        fp = ""
    digits = ip + fp
    n = len(ip) + (int(exp) if exp else 0)
    stripped = digits.lstrip("0")
    n -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k = len(digits)
    if k <= n <= 21:
        out = digits + "0" * (n - k)
    elif 0 < n <= 21:
        out = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        out = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        esign = "+" if e >= 0 else "-"
        head = digits[0] + ("." + digits[1:] if k > 1 else "")
        out = f"{head}e{esign}{abs(e)}"
    return sign + out


def _quote_checked(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("strings must not contain lone surrogates (I-JSON)") from None
    return _quote(s)


def _encode(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(_quote(value) if value.isascii() else _quote_checked(value))
    elif isinstance(value, dict):
        keys = list(value)
        for k in keys:
            if not isinstance(k, str):
                raise ValueError(f"object keys must be strings, got {type(k).__name__}")
        if all(k.isascii() for k in keys):
            keys.sort()
        else:
            keys.sort(key=_utf16_key)
        out.append("{")
        first = True
        for k in keys:
            if first:
                first = False
            else:
                out.append(",")
            out.append(_quote(k) if k.isascii() else _quote_checked(k))
            out.append(":")
            _encode(value[k], out)
        out.append("}")
    elif isinstance(value, (list, tuple)):
        out.append("[")
        first = True
        for item in value:
            if first:
                first = False
            else:
                out.append(",")
            _encode(item, out)
        out.append("]")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif value is None:
        out.append("null")
    elif isinstance(value, (int, float)):
        out.append(format_number(value))
    else:
        raise ValueError(f"not JSON-serializable: {type(value).__name__}")


def _plain(value: Any) -> bool:
    """True if ``json.dumps(sort_keys=True)`` already yields the JCS form of ``value``.

    That holds for exact dicts/lists/strs/bools/None and safe-range ints, with string keys
    that have no astral characters (code point order == UTF-16 order). Floats take the slow path.
    """
    t = type(value)
    if t is dict:
        for k, x in value.items():
            if type(k) is not str or (not k.isascii() and max(k) > "\uffff"):
                return False
            tx = type(x)
            if tx is str or x is None or tx is bool:
                continue
            if not _plain(x):
                return False
        return True
    if t is list:
        for x in value:
            tx = type(x)
            if tx is str or x is None or tx is bool:
                continue
            if not _plain(x):
                return False
        return True
    if t is str or value is None or t is bool:
        return True
    if t is int:
        return -_MAX_SAFE_INT <= value <= _MAX_SAFE_INT
    return False


def _not_json(value: Any) -> Any:
    raise ValueError(f"not JSON-serializable: {type(value).__name__}")


def _make_dumps() -> Callable[[Any], str]:
    """The C encoder, built once (``JSONEncoder.encode`` builds one per call): sorted keys, no spaces.

    No circular-reference markers: :func:`_plain` has walked the value first, and a cycle makes
    that walk recurse until ``RecursionError``.
    """
    portable = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False).encode
    make = json.encoder.c_make_encoder  # type: ignore[attr-defined]
    if make is None:  # a Python without the _json accelerator
        return portable
    try:
        encode = make(None, _not_json, _quote, None, ":", ",", True, False, False)
    except TypeError:  # another signature: use the public API
        return portable
    join = "".join

    def dumps(value: Any) -> str:
        return join(encode(value, 0))

    probe = {"b": [1, "\n\u00e9", None, True], "a": {"\u20ac": ""}}
    return dumps if dumps(probe) == portable(probe) else portable


_dumps = _make_dumps()


def canonicalize(value: Any) -> bytes:
    """The JCS canonical form of a JSON value as UTF-8 bytes (what gets hashed and signed).

    ``ValueError`` for NaN/Infinity, non-string keys, lone surrogates or non-JSON types.
    """
    try:
        if _plain(value):
            text = _dumps(value)  # C encoder: same escaping and order for this subset
        else:
            out: list[str] = []
            _encode(value, out)
            text = "".join(out)
    except RecursionError:
        raise ValueError("JSON value nested too deeply (or circular)") from None
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("strings must not contain lone surrogates (I-JSON)") from None


def canonicalize_str(value: Any) -> str:
    """The JCS canonical form of a JSON value as text."""
    return canonicalize(value).decode("utf-8")


__all__ = ["canonicalize", "canonicalize_str", "format_number"]
