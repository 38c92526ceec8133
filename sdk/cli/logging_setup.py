"""Logging for long-running commands: text or JSON lines, to stderr or a file.

JSON lines carry ``ts`` (ISO 8601 UTC), ``level``, ``logger``, ``msg`` and every ``extra=`` field
the call passed, plus ``exc`` with the formatted traceback when there is one::

    {"ts": "2026-12-01T12:00:00.123Z", "level": "INFO", "logger": "sdk.coord", "msg": "up", "did": "..."}
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_MARK = "_autoglm_cli_handler"
#: libraries that log every connection at INFO: shown from WARNING unless the level is debug
CHATTY = ("amqtt", "transitions")

# attributes every LogRecord has; anything else on a record came from ``extra=``
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; values that are not JSON are written as their ``str``."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
            + f"{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each record (test runners swap it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def parse_level(level: str) -> int:
    """``"info"`` → ``logging.INFO``; anything else raises ``ValueError`` naming the choices."""
    name = level.strip().lower() if isinstance(level, str) else ""
    if name not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    return int(getattr(logging, name.upper()))


def setup_logging(*, level: str = "info", fmt: str = "text", file: Path | None = None) -> logging.Handler:
    """Give the root logger our handler (replacing one an earlier call added) and return it."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {fmt!r}")
    numeric = parse_level(level)
    handler: logging.Handler
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _MARK, False):       # ours from an earlier call; leave other handlers be
            root.removeHandler(old)
            old.close()
    setattr(handler, _MARK, True)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in CHATTY:                      # the embedded broker's per-connection chatter
        logging.getLogger(name).setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
    return handler


__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JsonFormatter", "parse_level", "setup_logging"]
