"""Coordination errors (coordinator daemon and device SDK), each with a stable ``reason``."""

from __future__ import annotations

from sdk.coord.errors import AdmissionError, ConfigRejected, NotAdmitted
from sdk.errors import CoordinationError


class ConfigFileError(CoordinationError):
    """The coordinator's TOML configuration is missing, unreadable or invalid."""

    reason = "invalid_config_file"


class RuleError(CoordinationError):
    """A rule failed validation at load; the message names the rule and the field."""

    reason = "invalid_rule"


class StoreError(CoordinationError):
    """The state store could not read or write (corrupt file, disk full...)."""

    reason = "store_error"


__all__ = [
    "CoordinationError",
    "ConfigFileError",
    "RuleError",
    "StoreError",
    "AdmissionError",
    "ConfigRejected",
    "NotAdmitted",
]
