"""The Open-AutoGLM model metadata standard: one JSON document describing a served model.

The formal definition is ``schemas/model-metadata.schema.json`` (JSON Schema 2020-12);
:func:`validate_metadata` checks a document against it with a small built-in validator (the
subset of keywords that schema uses), so nodes need no ``jsonschema`` package.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import re
from pathlib import Path
from typing import Any

from sdk.errors import InferenceError

log = logging.getLogger(__name__)

SCHEMA_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).parent / "schemas" / "model-metadata.schema.json"

_SUPPORTED_KEYWORDS = frozenset(
    {
        "$schema", "$id", "$defs", "$ref", "title", "description", "type", "enum", "const",
        "properties", "required", "additionalProperties", "patternProperties", "minProperties",
        "items", "minItems", "uniqueItems", "minimum", "maximum", "exclusiveMinimum",
        "minLength", "maxLength", "pattern", "oneOf", "anyOf", "default",
    }
)  # fmt: skip


class MetadataError(InferenceError):
    """A metadata document that does not follow the standard; ``errors`` lists every violation."""

    reason = "invalid_metadata"

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid model metadata: " + "; ".join(errors))
        self.errors = errors


@functools.cache
def metadata_schema() -> dict[str, Any]:
    """The JSON Schema of the metadata document (parsed once; do not mutate)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------------------- validator

_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref is supported, got {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _check(value: Any, schema: dict[str, Any], path: str, root: dict[str, Any], errors: list[str]) -> None:
    unknown = set(schema) - _SUPPORTED_KEYWORDS
    if unknown:
        raise ValueError(f"schema at {path} uses unsupported keywords {sorted(unknown)}")
    if "$ref" in schema:
        _check(value, _resolve(schema["$ref"], root), path, root, errors)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            errors.append(f"{path}: expected {' or '.join(types)}, got {type(value).__name__} {value!r:.60}")
            return
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: must be {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            errors.append(f"{path}: shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            errors.append(f"{path}: longer than {schema['maxLength']} characters")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{path}: {value} is above the maximum {schema['maximum']}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: {value} must be greater than {schema['exclusiveMinimum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: needs at least {schema['minItems']} items")
        if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
            errors.append(f"{path}: items must be unique")
        if "items" in schema:
            for i, item in enumerate(value):
                _check(item, schema["items"], f"{path}[{i}]", root, errors)
    if isinstance(value, dict):
        _check_object(value, schema, path, root, errors)
    for key in ("oneOf", "anyOf"):
        if key in schema:
            matches = 0
            for option in schema[key]:
                sub: list[str] = []
                _check(value, option, path, root, sub)
                matches += not sub
            if matches == 0 or (key == "oneOf" and matches > 1):
                need = "exactly one" if key == "oneOf" else "at least one"
                errors.append(f"{path}: matches {matches} of the allowed forms ({key}), needs {need}")


def _check_object(
    value: dict[str, Any], schema: dict[str, Any], path: str, root: dict[str, Any], errors: list[str]
) -> None:
    for name in schema.get("required", []):
        if name not in value:
            errors.append(f"{path}: missing required field {name!r}")
    if len(value) < schema.get("minProperties", 0):
        errors.append(f"{path}: needs at least {schema['minProperties']} fields")
    props: dict[str, Any] = schema.get("properties", {})
    patterns: dict[str, Any] = schema.get("patternProperties", {})
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        child = f"{path}.{name}"
        matched = False
        if name in props:
            _check(item, props[name], child, root, errors)
            matched = True
        for pattern, sub in patterns.items():
            if re.search(pattern, name):
                _check(item, sub, child, root, errors)
                matched = True
        if matched:
            continue
        if extra is False:
            errors.append(f"{path}: unknown field {name!r}")
        elif isinstance(extra, dict):
            _check(item, extra, child, root, errors)


def schema_errors(value: Any, schema: dict[str, Any]) -> list[str]:
    """Every violation of ``schema`` by ``value`` (empty when valid); paths look like ``$.device.type``."""
    errors: list[str] = []
    _check(value, schema, "$", schema, errors)
    return errors


def validate_metadata(doc: Any) -> dict[str, Any]:
    """Return ``doc`` if it follows the metadata standard, else raise :class:`MetadataError` listing why."""
    errors = schema_errors(doc, metadata_schema())
    if errors:
        log.warning("invalid model metadata (%d problems): %s", len(errors), errors[0])
        raise MetadataError(errors)
    return doc


# ----------------------------------------------------------------------------------------- request/result


def request_schema(context_length: int) -> dict[str, Any]:
    """JSON Schema of a generation request (``sdk.inference.types.GenerationRequest``)."""
    return {
        "type": "object",
        "title": "GenerationRequest",
        "description": "Exactly one of prompt, messages (chat template) or prompt_token_ids.",
        "properties": {
            "prompt": {"type": "string"},
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
                        "content": {"type": "string"},
                    },
                },
            },
            "prompt_token_ids": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
            "max_new_tokens": {
                "type": "integer", "minimum": 1, "maximum": context_length - 1, "default": 256,
            },
            "temperature": {"type": "number", "minimum": 0, "default": 1.0, "description": "0 means greedy"},
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0},
            "top_k": {"type": "integer", "minimum": 0, "default": 0, "description": "0 disables"},
            "stop": {"type": "array", "items": {"type": "string", "minLength": 1}},
            "seed": {"type": ["integer", "null"]},
            "request_id": {"type": ["string", "null"]},
            "model": {"type": ["string", "null"], "description": "served model name (mesh routing)"},
            "response_format": {
                "type": ["object", "null"],
                "description": "OpenAI response_format: json_schema or json_object (constrained decoding)",
                "required": ["type"],
                "properties": {"type": {"type": "string", "enum": ["text", "json_object", "json_schema"]}},
            },
            "tools": {
                "type": ["array", "null"],
                "description": "OpenAI function tools, shown through the chat template",
                "items": {"type": "object", "required": ["type", "function"]},
            },
            "generated_prefix": {
                "type": "integer", "minimum": 0, "default": 0,
                "description": "trailing prompt_token_ids already generated under response_format (resume)",
            },
        },
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}, {"required": ["prompt_token_ids"]}],
        "additionalProperties": False,
    }


def _usage_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "time_to_first_token_s", "tokens_per_s"],
        "properties": {
            "prompt_tokens": {"type": "integer", "minimum": 0},
            "completion_tokens": {"type": "integer", "minimum": 0},
            "time_to_first_token_s": {"type": "number", "minimum": 0},
            "tokens_per_s": {"type": "number", "minimum": 0},
            "cached_prompt_tokens": {"type": "integer", "minimum": 0},
        },
    }


def result_schema() -> dict[str, Any]:
    """JSON Schema of a generation result; ``$defs.TokenChunk`` is one streamed chunk."""
    finish = {"type": "string", "enum": ["stop", "length", "cancelled"]}
    return {
        "type": "object",
        "title": "GenerationResult",
        "required": ["text", "token_ids", "finish_reason", "usage"],
        "properties": {
            "text": {"type": "string"},
            "token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "finish_reason": finish,
            "usage": _usage_schema(),
        },
        "$defs": {
            "TokenChunk": {
                "type": "object",
                "required": ["text", "token_ids"],
                "properties": {
                    "text": {"type": "string"},
                    "token_ids": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                    "finish_reason": {
                        "type": ["string", "null"], "enum": ["stop", "length", "cancelled", None],
                    },
                    "usage": {"oneOf": [{"type": "null"}, _usage_schema()]},
                },
            }
        },
    }


# ----------------------------------------------------------------------------------------- build


def _versions() -> dict[str, str]:
    import torch
    import transformers

    import sdk

    return {
        "name": "transformers",
        "version": transformers.__version__,
        "torch": torch.__version__,
        "sdk": sdk.__version__,
    }


def describe_device(device: Any) -> dict[str, Any]:
    """Type, human name and memory of a torch device."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        return {
            "type": "cuda",
            "name": props.name,
            "count": torch.cuda.device_count(),
            "memory_bytes": int(props.total_memory),
        }
    if dev.type == "mps":
        return {"type": "mps", "name": "Apple MPS", "memory_bytes": None}
    from sdk.inference.placement import available_ram_bytes

    total: int | None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        total = available_ram_bytes()
    name = platform.processor() or platform.machine() or "cpu"
    return {"type": "cpu", "name": name, "memory_bytes": int(total)}


def _architecture(model: Any) -> dict[str, Any]:
    from sdk.inference.placement import model_dims

    cfg = model.config
    dims = model_dims(cfg)
    text = getattr(cfg, "text_config", None) or cfg
    arch = {
        "family": str(getattr(cfg, "model_type", "unknown") or "unknown"),
        "class": type(model).__name__,
        "layers": dims["layers"],
        "hidden_size": int(text.hidden_size),
        "intermediate_size": getattr(text, "intermediate_size", None),
        "attention_heads": dims["heads"],
        "kv_heads": dims["kv_heads"],
        "head_dim": dims["head_dim"],
        "vocab_size": int(text.vocab_size),
        "max_position_embeddings": dims["context_length"],
        "tied_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
    }
    return arch


def count_parameters(model: Any) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return int(sum(p.numel() for p in model.parameters()))


def build_metadata(
    model: Any,
    tokenizer: Any = None,
    *,
    name: str,
    version: str,
    device: Any,
    dtype: Any,
    context_length: int | None = None,
    quantization: dict[str, Any] | None = None,
    serving: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Describe a loaded transformers model as a metadata document (validated before return).

    ``context_length`` (the engine's ``max_sequence_length``) is capped at the model's
    ``max_position_embeddings``; an engine passes its sizing as ``serving``.
    """
    from sdk.inference.placement import dtype_name, model_dims

    model_context = model_dims(model.config)["context_length"]
    context = model_context if context_length is None else min(int(context_length), model_context)
    capabilities = ["completion", "streaming", "token_ids", "continuous_batching"]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        capabilities.insert(1, "chat")
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": name,
        "version": version,
        "framework": _versions(),
        "architecture": _architecture(model),
        "parameters": count_parameters(model),
        "dtype": dtype_name(dtype),
        "quantization": quantization,
        "context_length": context,
        "device": describe_device(device),
        "capabilities": capabilities,
        "inputs": request_schema(context),
        "outputs": result_schema(),
    }
    if serving:
        doc["serving"] = dict(serving)
    return validate_metadata(doc)


def with_serving(doc: dict[str, Any], serving: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``doc`` with the engine's sizing merged into ``serving`` (validated)."""
    out = dict(doc)
    out["serving"] = {**doc.get("serving", {}), **serving}
    if "max_sequence_length" in serving:
        out["context_length"] = min(int(serving["max_sequence_length"]), int(doc["context_length"]))
        out["inputs"] = request_schema(out["context_length"])
    return validate_metadata(out)


__all__ = [
    "SCHEMA_VERSION",
    "SCHEMA_PATH",
    "MetadataError",
    "build_metadata",
    "count_parameters",
    "describe_device",
    "metadata_schema",
    "request_schema",
    "result_schema",
    "schema_errors",
    "validate_metadata",
    "with_serving",
]
