"""Checks for common command-line values, run before anything slow starts.

Each returns the cleaned value or raises :class:`sdk.cli.errors.CliError` with ``usage=True``
(exit 2, one ``error:`` line and a ``hint:``)::

    url = options.broker_url(broker, allow_embedded=True)
    level = options.log_level(log_level)          # logging.INFO ...
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit

from sdk.cli.errors import CliError

BROKER_SCHEMES = ("mqtt", "mqtts", "tcp", "ssl")  # tcp/ssl: the transport's aliases
EMBEDDED = "embedded"
LOG_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def broker_url(value: str, *, allow_embedded: bool = False, option: str = "--broker") -> str:
    """``value`` if it is an ``mqtt://`` / ``mqtts://`` URL with a host (or ``embedded`` where allowed)."""
    text = value.strip()
    if allow_embedded and text == EMBEDDED:
        return text
    choices = "mqtt://HOST:PORT or mqtts://HOST:PORT" + (", or embedded" if allow_embedded else "")
    hint = f"use {choices}, e.g. {option} mqtt://127.0.0.1:1883"

    def bad(why: str) -> CliError:
        return CliError("invalid_broker_url", f"{option} {value!r}: {why}", hint=hint, usage=True)

    if "://" not in text:
        raise bad("not a broker URL (no mqtt:// or mqtts://)")
    parts = urlsplit(text)
    if parts.scheme not in BROKER_SCHEMES:
        raise bad(f"unsupported scheme {parts.scheme!r}")
    try:
        port = parts.port
    except ValueError:
        raise bad("the port is not a number from 1 to 65535") from None
    if not parts.hostname:
        raise bad("no host")
    if port == 0:
        raise bad("the port is not a number from 1 to 65535")
    if parts.path not in ("", "/"):
        raise bad(f"unexpected path {parts.path!r}")
    return text


def log_level(value: str, *, option: str = "--log-level") -> int:
    """The :mod:`logging` level for a name (``debug``, ``info``, ``warning``, ``error``, ``critical``)."""
    level = LOG_LEVELS.get(value.strip().lower())
    if level is None:
        raise CliError("invalid_log_level", f"{option} {value!r} is not a log level",
                       hint=f"use one of: {', '.join(LOG_LEVELS)}", usage=True)
    return level


__all__ = ["broker_url", "log_level", "BROKER_SCHEMES", "LOG_LEVELS", "EMBEDDED"]
