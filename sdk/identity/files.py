"""Reading credential files: a JSON credential/presentation, or a compact VC-JWT.

``load_credential(path)`` is the one reader for ``--credential`` style options and config
entries: strict JSON (no duplicate members, bounded size and depth) or a JWT on one line
(optionally JSON-quoted). Errors are :class:`CredentialFileError` with a stable ``reason``.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from sdk.identity.errors import MalformedError
from sdk.identity.hazmat import json as strict_json

log = logging.getLogger(__name__)

#: Largest credential file read (bytes).
MAX_CREDENTIAL_BYTES = 1024 * 1024


class CredentialFileError(MalformedError):
    """A credential file is missing, unreadable, too large, or neither JSON nor a JWT.

    ``reason`` is ``credential_not_found``, ``credential_io`` or ``malformed``.
    """


def parse_credential_text(text: str, *, source: str = "credential") -> dict[str, Any] | str:
    """A JSON object (dict) or a compact JWT (str) from ``text``; :class:`CredentialFileError` otherwise."""
    text = text.strip()
    if text.startswith("{"):
        try:
            doc = strict_json.loads(text, max_bytes=MAX_CREDENTIAL_BYTES)
        except ValueError as exc:
            raise CredentialFileError(f"{source}: not valid JSON ({exc})", reason="malformed") from None
        if not isinstance(doc, dict):  # pragma: no cover - text starts with '{'
            raise CredentialFileError(f"{source}: not a JSON object", reason="malformed")
        return doc
    if text.startswith('"'):
        try:
            quoted = strict_json.loads(text, max_bytes=MAX_CREDENTIAL_BYTES)
        except ValueError:
            quoted = None
        text = quoted.strip() if isinstance(quoted, str) else ""
    if text.count(".") == 2 and text.isascii() and not any(c.isspace() for c in text):
        return text
    raise CredentialFileError(f"{source}: neither a JSON credential nor a compact JWT", reason="malformed")


def load_credential(path: str | os.PathLike[str]) -> dict[str, Any] | str:
    """Read a credential (or presentation) file: a dict for JSON, a str for a VC-JWT.

    ``"-"`` reads standard input.
    """
    name = os.fspath(path)
    if name == "-":
        text = sys.stdin.read(MAX_CREDENTIAL_BYTES + 1)
    else:
        try:
            with Path(name).expanduser().open("rb") as fh:
                raw = fh.read(MAX_CREDENTIAL_BYTES + 1)
        except FileNotFoundError:
            raise CredentialFileError(f"no credential file {name}", reason="credential_not_found") from None
        except OSError as exc:
            raise CredentialFileError(f"cannot read credential file {name}: {exc}",
                                      reason="credential_io") from exc
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CredentialFileError(f"{name}: not UTF-8 text", reason="malformed") from None
    if len(text) > MAX_CREDENTIAL_BYTES:
        raise CredentialFileError(f"{name}: larger than {MAX_CREDENTIAL_BYTES} bytes", reason="malformed")
    doc = parse_credential_text(text, source=name)
    log.debug("loaded credential file %s (%s)", name, "JSON" if isinstance(doc, dict) else "JWT")
    return doc


__all__ = ["load_credential", "parse_credential_text", "CredentialFileError", "MAX_CREDENTIAL_BYTES"]
