"""The coordinator: admits devices (DID + VP), runs adaptation rules, pushes signed configs.

Modules: ``config`` (TOML), ``rules``, ``store`` (SQLite WAL), ``registry``, ``metrics``,
``auth`` (handshake),
``daemon`` (the :class:`Coordinator`).
"""

from sdk.coord.coordinator.auth import (
    COORDINATOR_CREDENTIAL,
    DEVICE_CREDENTIAL,
    OPERATOR_CREDENTIAL,
    check_presentation,
    coordinator_credential,
    device_credential,
    operator_credential,
)
from sdk.coord.coordinator.config import CoordinatorConfig, TrustedIssuer, load_config, parse_config
from sdk.coord.coordinator.daemon import Coordinator, load_key
from sdk.coord.coordinator.errors import (
    AdmissionError,
    ConfigFileError,
    ConfigRejected,
    NotAdmitted,
    RuleError,
    StoreError,
)
from sdk.coord.coordinator.metrics import CoordinatorMetrics
from sdk.coord.coordinator.registry import DeviceRecord, Registry
from sdk.coord.coordinator.rules import Rule, RuleSet, load_rules, parse_rules
from sdk.coord.coordinator.store import ConfigVersion, Store

__all__ = [
    "Coordinator",
    "CoordinatorConfig",
    "TrustedIssuer",
    "load_config",
    "parse_config",
    "load_key",
    "Rule",
    "RuleSet",
    "load_rules",
    "parse_rules",
    "Store",
    "ConfigVersion",
    "Registry",
    "DeviceRecord",
    "CoordinatorMetrics",
    "DEVICE_CREDENTIAL",
    "COORDINATOR_CREDENTIAL",
    "OPERATOR_CREDENTIAL",
    "device_credential",
    "operator_credential",
    "coordinator_credential",
    "check_presentation",
    "AdmissionError",
    "ConfigFileError",
    "ConfigRejected",
    "NotAdmitted",
    "RuleError",
    "StoreError",
]
