"""Errors shared by the device SDK and the coordinator, each with a stable ``reason``."""

from __future__ import annotations

from sdk.errors import CoordinationError


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


class MalformedConfig(ConfigRejected, ValueError):
    """A config document does not have the shape of :class:`sdk.coord.protocol.ConfigVersion`."""

    reason = "malformed"


class NotAdmitted(CoordinationError):
    """The device is not (or no longer) admitted by the coordinator."""

    reason = "not_admitted"


class OperatorError(CoordinationError):
    """An operator request failed; ``reason`` says why (see docs/OPERATIONS.md for the table):
    ``not_authorized``, ``forbidden``, ``unknown_op``, ``invalid_params``, ``not_found``, ``offline``,
    ``timeout``, ``no_such_method``, ``handler_error``, ``not_issuer``, ``token_used``,
    ``token_expired``, ``busy``."""

    reason = "operator_error"


__all__ = ["CoordinationError", "AdmissionError", "ConfigRejected", "MalformedConfig", "NotAdmitted",
           "OperatorError"]
