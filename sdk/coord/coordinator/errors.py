"""Coordination errors (coordinator daemon and device SDK), each with a stable ``reason``."""

from __future__ import annotations

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


class AdmissionError(CoordinationError):
    """Authentication between a device and the coordinator failed.

    ``reason`` is one of: ``untrusted_issuer``, ``revoked``, ``expired``, ``not_yet_valid``,
    ``wrong_challenge``, ``bad_signature``, ``holder_mismatch``, ``missing_credential``,
    ``malformed``, ``untrusted_coordinator``, ``timeout``, ``unknown_session``.
    """

    reason = "admission_failed"


class ConfigRejected(CoordinationError):
    """A pushed config failed verification on the device (forged, wrong device, stale)."""

    reason = "config_rejected"


class NotAdmitted(CoordinationError):
    """The device is not (or no longer) admitted by the coordinator."""

    reason = "not_admitted"


__all__ = [
    "CoordinationError",
    "ConfigFileError",
    "RuleError",
    "StoreError",
    "AdmissionError",
    "ConfigRejected",
    "NotAdmitted",
]
