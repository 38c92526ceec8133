"""A model's context length read from its files (``config.json`` or the GGUF header), without
torch and without loading weights, so an out-of-range ``max_sequence_length`` is refused before
the model loads. ``None`` when the files do not say (the engine checks again once loaded).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

#: The engine's ``max_sequence_length`` when none is given: the model's context, at most this.
DEFAULT_MAX_SEQUENCE_LENGTH = 8192

_GGUF_MAGIC = b"GGUF"
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_INTS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 10: "<Q", 11: "<q"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_MAX_STRING = 1 << 24  # a header string longer than this means a corrupt file
_MAX_KEYS = 1 << 16


def config_context_length(config: Any) -> int | None:
    """``max_position_embeddings`` of a transformers ``config.json`` document (or its ``text_config``)."""
    if not isinstance(config, dict):
        return None
    for doc in (config, config.get("text_config")):
        if isinstance(doc, dict):
            value = doc.get("max_position_embeddings")
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def transformers_context_length(directory: str | os.PathLike[str]) -> int | None:
    """The context length in ``directory/config.json`` (None if absent or unreadable)."""
    try:
        config = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.debug("no context length from %s: %s", directory, exc)
        return None
    return config_context_length(config)


class _Corrupt(Exception):
    pass


def _read(fh: IO[bytes], n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise _Corrupt("truncated header")
    return data


def _u32(fh: IO[bytes]) -> int:
    return int(struct.unpack("<I", _read(fh, 4))[0])


def _u64(fh: IO[bytes]) -> int:
    return int(struct.unpack("<Q", _read(fh, 8))[0])


def _string(fh: IO[bytes]) -> bytes:
    n = _u64(fh)
    if n > _MAX_STRING:
        raise _Corrupt("string too long")
    return _read(fh, n)


def _skip(fh: IO[bytes], vtype: int) -> None:
    if vtype in _GGUF_FIXED:
        fh.seek(_GGUF_FIXED[vtype], os.SEEK_CUR)
    elif vtype == _GGUF_STRING:
        fh.seek(_u64(fh), os.SEEK_CUR)
    elif vtype == _GGUF_ARRAY:
        inner, count = _u32(fh), _u64(fh)
        if inner in _GGUF_FIXED:
            fh.seek(_GGUF_FIXED[inner] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip(fh, inner)
    else:
        raise _Corrupt(f"unknown value type {vtype}")


def gguf_context_length(path: str | os.PathLike[str]) -> int | None:
    """``<architecture>.context_length`` from a GGUF file's key-value header (only the header is read)."""
    try:
        with open(path, "rb") as fh:
            if _read(fh, 4) != _GGUF_MAGIC or _u32(fh) < 2:
                return None
            _u64(fh)  # tensor count
            keys = _u64(fh)
            arch: str | None = None
            for _ in range(min(keys, _MAX_KEYS)):
                key = _string(fh).decode("utf-8", "replace")
                vtype = _u32(fh)
                if key == "general.architecture" and vtype == _GGUF_STRING:
                    arch = _string(fh).decode("utf-8", "replace")
                elif key.endswith(".context_length") and vtype in _GGUF_INTS and (
                        arch is None or key == f"{arch}.context_length"):
                    fmt = _GGUF_INTS[vtype]
                    value = int(struct.unpack(fmt, _read(fh, struct.calcsize(fmt)))[0])
                    return value if value > 0 else None
                else:
                    _skip(fh, vtype)
    except (OSError, _Corrupt, struct.error) as exc:
        log.debug("no context length from %s: %s", path, exc)
    return None


def model_context_length(model_path: str | os.PathLike[str] | None) -> int | None:
    """The context length of the model ``model_path`` names (None: the bundled SmolLM2), or None
    when it cannot be told without loading it. Raises the loader's ``ModelNotFound``."""
    from sdk.inference.loader import resolve_model_path  # torch: loaded anyway to serve the model

    source = resolve_model_path(model_path)
    if source.kind == "gguf":
        return gguf_context_length(source.path)
    return transformers_context_length(source.path)


__all__ = [
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "config_context_length",
    "gguf_context_length",
    "model_context_length",
    "transformers_context_length",
]
