"""Output constraints without the grammar library: checking ``response_format`` and ``tools``
before any compile work, and the canonical form the compiled-grammar cache is keyed on.

Everything here is plain Python (no torch, no grammar library), so routers, the HTTP app and
the mesh check a constraint with the same bounds the engine does.

    InvalidRequest (reason "invalid_request")
    ├── InvalidSchema      reason "invalid_schema"      not a JSON Schema the compiler accepts
    │   └── SchemaTooLarge reason "schema_too_large"    over the size, depth or node bounds
    └── UnsupportedSchema  reason "unsupported_schema"  a keyword or construct we do not constrain
    StructuredOutputUnavailable (InferenceError) reason "structured_output_unavailable":
                           this engine has no grammar library (a node answers it; the mesh fails over)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InferenceError, InvalidRequest

log = logging.getLogger(__name__)

#: Bounds on a schema, checked before it is compiled (compiling is CPU work a caller could buy).
MAX_SCHEMA_BYTES = 64 * 1024  # canonical JSON
MAX_SCHEMA_DEPTH = 24  # nested objects/arrays of the schema document itself
MAX_SCHEMA_NODES = 4096  # objects + arrays + scalars of the schema document
MAX_TOOLS = 64
MAX_TOOL_DESCRIPTION = 4096
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function and schema names

Kind = Literal["json_schema", "json_object"]


class InvalidSchema(InvalidRequest):
    """A ``response_format`` or tool schema that is malformed (``field`` says which)."""

    reason = "invalid_schema"


class SchemaTooLarge(InvalidSchema):
    """A schema over :data:`MAX_SCHEMA_BYTES`, :data:`MAX_SCHEMA_DEPTH` or :data:`MAX_SCHEMA_NODES`."""

    reason = "schema_too_large"


class UnsupportedSchema(InvalidRequest):
    """A schema using something the grammar compiler cannot constrain (e.g. a remote ``$ref``)."""

    reason = "unsupported_schema"


class StructuredOutputUnavailable(InferenceError):
    """The engine cannot constrain output (no grammar library installed); never answered unconstrained."""

    reason = "structured_output_unavailable"


@dataclass(frozen=True)
class Constraint:
    """A checked output constraint: ``schema`` is the JSON Schema the output must match.

    ``key`` is the SHA-256 of the canonical schema (the compiled-grammar cache key).
    """

    kind: Kind
    schema: dict[str, Any]
    key: str
    name: str = "response"


def canonical(value: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces) of a checked JSON value."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _walk(value: Any, field: str) -> None:
    """Raise unless ``value`` is plain JSON within the depth and node bounds."""
    nodes = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            raise SchemaTooLarge(f"{field}: the schema has over {MAX_SCHEMA_NODES} nodes", field=field)
        if isinstance(item, Mapping):
            if depth > MAX_SCHEMA_DEPTH:
                raise SchemaTooLarge(f"{field}: the schema nests deeper than {MAX_SCHEMA_DEPTH}", field=field)
            for k, v in item.items():
                if not isinstance(k, str):
                    raise InvalidSchema(f"{field}: object keys must be strings", field=field)
                if k == "$ref" and not (isinstance(v, str) and v.startswith("#")):
                    raise UnsupportedSchema(f"{field}: only local $ref (#/...) is supported", field=field)
                stack.append((v, depth + 1))
        elif isinstance(item, list | tuple):
            if depth > MAX_SCHEMA_DEPTH:
                raise SchemaTooLarge(f"{field}: the schema nests deeper than {MAX_SCHEMA_DEPTH}", field=field)
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidSchema(f"{field}: numbers must be finite", field=field)
        elif item is not None and not isinstance(item, str | int | float | bool):
            raise InvalidSchema(f"{field}: not a JSON value ({type(item).__name__})", field=field)


def check_schema(schema: Any, *, field: str = "response_format") -> dict[str, Any]:
    """Check a JSON Schema document against the bounds; return it (a dict)."""
    if not isinstance(schema, Mapping):
        raise InvalidSchema(f"{field}: the schema must be a JSON object", field=field)
    _walk(schema, field)
    if len(canonical(schema)) > MAX_SCHEMA_BYTES:
        raise SchemaTooLarge(f"{field}: the schema is over {MAX_SCHEMA_BYTES} bytes", field=field)
    kind = schema.get("type")
    types = kind if isinstance(kind, list) else [kind]
    known = {None, "object", "array", "string", "number", "integer", "boolean", "null"}
    if not all(isinstance(t, str | type(None)) and t in known for t in types):
        raise InvalidSchema(f"{field}: unknown type {kind!r}", field=field)
    return dict(schema)


def constraint_from(response_format: Any) -> Constraint | None:
    """The :class:`Constraint` of an OpenAI ``response_format`` (None for ``text`` or None).

    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` constrains to the
    schema; ``{"type": "json_object"}`` to any JSON object.
    """
    field = "response_format"
    if response_format is None:
        return None
    if not isinstance(response_format, Mapping):
        raise InvalidSchema("response_format must be an object", field=field)
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: dict[str, Any] = {"type": "object"}
        return Constraint("json_object", schema, hashlib.sha256(canonical(schema)).hexdigest(), "json_object")
    if kind != "json_schema":
        raise UnsupportedSchema(f"response_format type {kind!r} is not supported "
                                "(text, json_object, json_schema)", field=field)
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise InvalidSchema("response_format.json_schema must be an object", field=field)
    name = spec.get("name", "response")
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidSchema("response_format.json_schema.name must match [A-Za-z0-9_-]{1,64}", field=field)
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidSchema("response_format.json_schema.strict must be a boolean", field=field)
    schema = check_schema(spec.get("schema", {}), field=field)
    return Constraint("json_schema", schema, hashlib.sha256(canonical(schema)).hexdigest(), name)


def check_response_format(response_format: Any) -> None:
    """Raise the typed error for a malformed or oversized ``response_format``."""
    try:
        constraint_from(response_format)
    except InvalidRequest as exc:
        log.info("response_format refused (%s): %s", exc.reason, exc)
        raise


def check_tools(tools: Any) -> None:
    """Raise :class:`InvalidSchema` for a ``tools`` list that is not OpenAI-shaped or is over bounds."""
    field = "tools"
    if tools is None:
        return
    if not isinstance(tools, list | tuple) or not tools or len(tools) > MAX_TOOLS:
        raise InvalidSchema(f"tools must be a list of 1 to {MAX_TOOLS} functions", field=field)
    names: set[str] = set()
    total = 0
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(fn, Mapping):
            raise InvalidSchema(f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}",
                                field=field)
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name) or name in names:
            raise InvalidSchema(f"tools[{i}].function.name must be a unique name matching [A-Za-z0-9_-]{{1,64}}",
                                field=field)
        names.add(name)
        desc = fn.get("description")
        if desc is not None and (not isinstance(desc, str) or len(desc) > MAX_TOOL_DESCRIPTION):
            raise InvalidSchema(f"tools[{i}].function.description must be a string of at most "
                                f"{MAX_TOOL_DESCRIPTION} characters", field=field)
        total += len(canonical(check_schema(fn.get("parameters", {"type": "object"}), field=field)))
    if total > MAX_SCHEMA_BYTES:
        raise SchemaTooLarge(f"tools: the parameter schemas are over {MAX_SCHEMA_BYTES} bytes together",
                             field=field)


__all__ = [
    "Constraint",
    "InvalidSchema",
    "SchemaTooLarge",
    "UnsupportedSchema",
    "StructuredOutputUnavailable",
    "MAX_SCHEMA_BYTES",
    "MAX_SCHEMA_DEPTH",
    "MAX_SCHEMA_NODES",
    "MAX_TOOLS",
    "canonical",
    "check_schema",
    "check_response_format",
    "check_tools",
    "constraint_from",
]
