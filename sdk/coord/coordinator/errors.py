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


class StoreCorrupt(StoreError):
    """The state store (or the issuer state it migrates) is unreadable: refused unless started fresh."""

    reason = "store_corrupt"


class StoreMissing(StoreError):
    """The state store is gone or empty while other state says it held data: refused unless fresh."""

    reason = "store_missing"


class StoreBehind(StoreError):
    """A device reports a config version newer than the store holds (state lost or restored old)."""

    reason = "store_behind"


class StoreVersionError(StoreError):
    """The state store was written by a newer schema than this coordinator knows."""

    reason = "store_too_new"


class LeaseLost(StoreError):
    """A fenced write found the coordinator lease held by another token: nothing was written."""

    reason = "lease_lost"


class StoreUnavailable(StoreError):
    """The state store's server cannot be reached (connection lost); the next call reconnects."""

    reason = "store_unavailable"


class InvalidValue(CoordinationError):
    """A number or JSON value is not finite, out of range, or cannot be serialised and signed."""

    reason = "invalid_value"


class RuleOutputError(CoordinationError):
    """A rule produced a config that cannot be committed and signed (non-finite number, too large)."""

    reason = "invalid_rule_output"


__all__ = [
    "CoordinationError",
    "ConfigFileError",
    "RuleError",
    "StoreError",
    "StoreCorrupt",
    "StoreMissing",
    "StoreBehind",
    "StoreVersionError",
    "LeaseLost",
    "StoreUnavailable",
    "InvalidValue",
    "RuleOutputError",
    "AdmissionError",
    "ConfigRejected",
    "NotAdmitted",
]
