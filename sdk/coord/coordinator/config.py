"""The coordinator's TOML configuration, loaded into frozen dataclasses.

    [coordinator]
    broker = "mqtt://127.0.0.1:1883"   # or mqtts://..., or "embedded" to start an in-process broker,
                                         # "embedded://HOST:PORT" on a fixed port, or a list of URLs
                                         # (broker failover: ["mqtts://a:8883", "mqtts://b:8883"])
    data_dir = "./coordinator-data"      # SQLite state (WAL) and the status list
    heartbeat_ttl = 30                   # seconds without a heartbeat before a device expires
    durability = "normal"                # "full" = fsync every commit (survives power loss)
    metrics_port = 0                     # Prometheus /metrics on 127.0.0.1 (0 = off)
    status_republish = 0                 # re-publish the status list every N s (0 = never): for
                                         # clustered brokers whose retained messages are per node

    [identity]
    keystore = "coordinator.keystore"    # encrypted keystore (autoglm id new)
    passphrase_env = "AUTOGLM_PASSPHRASE"
    credential = "coordinator-vc.json"   # the coordinator's own credential (mutual auth)

    [[trust]]                            # which issuers may issue which credential types
    issuer = "did:key:z6Mk..."
    types = ["DeviceCredential"]

    [issuer]                             # optional: the coordinator issues and revokes credentials
    keystore = "issuer.keystore"         # the issuing key (or key = "z..." multibase, for tests)
    passphrase_env = "AUTOGLM_PASSPHRASE"  # default: that of [identity]
    status_list_size = 131072            # bits in the issuer's status list (>= 131072, multiple of 8)
    credential_valid_for = "30d"         # validity of issued credentials: seconds, or "30d" / "12h" / "90m"
    renew_after = 0.6667                 # devices renew at this fraction of their validity period
    manufacturer_approve = "manual"      # enrollment by ManufacturerCredential: "auto" or "manual"

    rules_file = "rules.toml"            # and/or inline [[rules]] tables

    [store]                              # optional: where the state lives (default: SQLite in data_dir)
    url = "postgresql://coord@db:5432/autoglm"   # or a path, or "sqlite:///abs/path.db"

    [ha]                                 # optional: hot standby (needs a shared [store] url)
    enabled = true                       # run as one of several instances; one active at a time
    lease_ttl = 3.0                      # seconds; the active renews every ttl/3, standbys poll every ttl/5
    instance = "coord-a"                 # this instance's name (default: HOST-PID)

Relative paths are resolved against the config file's directory.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdk.coord.coordinator.errors import ConfigFileError
from sdk.coord.coordinator.model_policy import ModelSettings, parse_model_settings
from sdk.coord.coordinator.rules import RuleSet, parse_rules

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_TTL = 30.0
_TOP_KEYS = {"coordinator", "identity", "trust", "rules", "rules_file", "issuer", "store", "ha", "model"}
_COORD_KEYS = {"broker", "data_dir", "heartbeat_ttl", "durability", "metrics_port", "sweep_interval",
               "name", "status_republish"}
_ID_KEYS = {"keystore", "passphrase_env", "key", "credential"}


@dataclass(frozen=True)
class TrustedIssuer:
    """An issuer DID and the credential types it may issue."""

    issuer: str
    types: tuple[str, ...] = ("DeviceCredential",)


# -- [issuer]
DEFAULT_STATUS_LIST_SIZE = 131072
DEFAULT_CREDENTIAL_VALID_FOR = 30 * 86400.0
DEFAULT_RENEW_AFTER = 2 / 3
MAX_STATUS_LIST_SIZE = 1 << 24
_ISSUER_KEYS = {"keystore", "passphrase_env", "key", "status_list_size", "credential_valid_for", "renew_after",
                "manufacturer_approve"}
_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


@dataclass(frozen=True)
class IssuerConfig:
    """The ``[issuer]`` section: the key the coordinator issues credentials with, and their policy."""

    keystore: Path | None = None
    passphrase_env: str = "AUTOGLM_PASSPHRASE"
    key_multibase: str | None = None
    status_list_size: int = DEFAULT_STATUS_LIST_SIZE
    credential_valid_for: float = DEFAULT_CREDENTIAL_VALID_FOR
    renew_after: float = DEFAULT_RENEW_AFTER
    manufacturer_approve: str = "manual"


def parse_duration(value: Any, *, what: str) -> float:
    """Seconds from a number or a ``"30d"`` / ``"12h"`` / ``"90m"`` / ``"45s"`` / ``"2w"`` string."""
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and len(value) >= 2 and value[-1] in _UNITS:
        try:
            seconds = float(value[:-1]) * _UNITS[value[-1]]
        except ValueError:
            seconds = None
    if seconds is None or not math.isfinite(seconds) or not 1 <= seconds <= 10 * 365 * 86400:
        raise _err(f"{what} must be a duration between 1 s and 10 years (seconds, or \"30d\", \"12h\", "
                   f"\"90m\"), got {value!r}")
    return seconds


def _parse_issuer(table: Any, *, default_passphrase_env: str,
                  path: Callable[[Any, str], Path | None]) -> IssuerConfig:
    if not isinstance(table, dict):
        raise _err("[issuer] must be a table")
    unknown = set(table) - _ISSUER_KEYS
    if unknown:
        raise _err(f"unknown key(s) in [issuer]: {sorted(unknown)} (allowed: {sorted(_ISSUER_KEYS)})")
    key = table.get("key")
    if key is not None and (not isinstance(key, str) or not key):
        raise _err("issuer.key must be a private key multibase string")
    keystore = path(table.get("keystore"), "issuer.keystore")
    if (key is None) == (keystore is None):
        raise _err("[issuer] needs exactly one of 'keystore' (a keystore file) or 'key' (multibase)")
    env = table.get("passphrase_env", default_passphrase_env)
    if not isinstance(env, str) or not env:
        raise _err("issuer.passphrase_env must be an environment variable name")
    size = table.get("status_list_size", DEFAULT_STATUS_LIST_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) or size % 8 \
            or not DEFAULT_STATUS_LIST_SIZE <= size <= MAX_STATUS_LIST_SIZE:
        raise _err(f"issuer.status_list_size must be a multiple of 8 between {DEFAULT_STATUS_LIST_SIZE} and "
                   f"{MAX_STATUS_LIST_SIZE}, got {size!r}")
    valid_for = parse_duration(table.get("credential_valid_for", DEFAULT_CREDENTIAL_VALID_FOR),
                               what="issuer.credential_valid_for")
    renew = table.get("renew_after", DEFAULT_RENEW_AFTER)
    if isinstance(renew, bool) or not isinstance(renew, (int, float)) or not math.isfinite(renew) \
            or not 0.05 <= renew <= 0.95:
        raise _err(f"issuer.renew_after must be a fraction of the validity between 0.05 and 0.95, got {renew!r}")
    approve = table.get("manufacturer_approve", "manual")
    if approve not in ("auto", "manual"):
        raise _err(f"issuer.manufacturer_approve must be \"auto\" or \"manual\", got {approve!r}")
    return IssuerConfig(keystore=keystore, passphrase_env=env, key_multibase=key, status_list_size=size,
                        credential_valid_for=valid_for, renew_after=float(renew), manufacturer_approve=approve)
# -- end [issuer]


# -- [store]
_STORE_SCHEMES = ("postgresql://", "postgres://", "sqlite:")


def _parse_store(table: Any, *, path: Callable[[Any, str], Path | None]) -> str | None:
    """``[store] url``: a PostgreSQL or SQLite URL as written, or a path resolved like other paths."""
    if not isinstance(table, dict):
        raise _err("[store] must be a table")
    if set(table) - {"url"}:
        raise _err(f"unknown key(s) in [store]: {sorted(set(table) - {'url'})} (allowed: ['url'])")
    url = table.get("url")
    if url is None:
        return None
    if not isinstance(url, str) or not url.strip():
        raise _err("store.url must be a postgresql:// URL, a sqlite:/// URL or a path")
    if url.startswith(_STORE_SCHEMES):
        return url
    if "://" in url:
        raise _err(f"store.url has an unknown scheme: {url.split('://', 1)[0]!r} (postgresql or sqlite)")
    return str(path(url, "store.url"))
# -- end [store]


# -- [ha]
_HA_KEYS = {"enabled", "lease_ttl", "instance"}
_INSTANCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class HAConfig:
    """The ``[ha]`` section: this instance's part in a hot-standby group (sdk.coord.coordinator.ha)."""

    enabled: bool = False
    lease_ttl: float = 3.0
    instance: str | None = None


def _parse_ha(table: Any, *, store_url: str | None, broker: str) -> HAConfig:
    if not isinstance(table, dict):
        raise _err("[ha] must be a table")
    if set(table) - _HA_KEYS:
        raise _err(f"unknown key(s) in [ha]: {sorted(set(table) - _HA_KEYS)} (allowed: {sorted(_HA_KEYS)})")
    enabled = table.get("enabled", False)
    if not isinstance(enabled, bool):
        raise _err(f"ha.enabled must be true or false, got {enabled!r}")
    ttl = _number(table, "lease_ttl", 3.0, where="ha", minimum=0.5, maximum=600.0)
    instance = table.get("instance")
    if instance is not None and (not isinstance(instance, str) or not _INSTANCE.fullmatch(instance)):
        raise _err(f"ha.instance must be 1-64 letters, digits, '.', '_' or '-', got {instance!r}")
    if enabled and store_url is None:
        raise _err("[ha] enabled needs a [store] url that every instance shares (postgresql://...)")
    if enabled and not broker.startswith(("mqtt://", "mqtts://")):
        raise _err("[ha] enabled needs an external broker (coordinator.broker = mqtt(s):// URLs), "
                   f"not {broker!r}")
    return HAConfig(enabled=enabled, lease_ttl=ttl, instance=instance)
# -- end [ha]


@dataclass(frozen=True)
class CoordinatorConfig:
    """Everything the coordinator daemon needs to start."""

    broker: str = "embedded"
    data_dir: Path = Path("coordinator-data")
    heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL
    durability: str = "normal"
    metrics_port: int = 0
    sweep_interval: float = 1.0
    status_republish: float = 0.0       # seconds between status list re-publications (0 = never)
    name: str = "coordinator"
    keystore: Path | None = None
    passphrase_env: str = "AUTOGLM_PASSPHRASE"
    key_multibase: str | None = None
    credential: Path | None = None
    trust: tuple[TrustedIssuer, ...] = ()
    rules: RuleSet = field(default_factory=RuleSet)
    issuer: IssuerConfig | None = None
    store_url: str | None = None        # [store] url; None = the SQLite file in data_dir
    model: ModelSettings | None = None  # [model]: the inference mesh for policy = "model" rules
    ha: HAConfig = field(default_factory=HAConfig)     # [ha]


def _err(msg: str) -> ConfigFileError:
    log.warning("coordinator config rejected: %s", msg)
    return ConfigFileError(msg)


def _number(table: dict[str, Any], key: str, default: float, *, where: str, minimum: float = 0,
            maximum: float = 3600.0) -> float:
    """A finite number in ``[minimum, maximum]`` (TOML also allows ``nan`` and ``inf``)."""
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not minimum <= value <= maximum:
        raise _err(f"{where}.{key} must be a finite number between {minimum} and {maximum}, got {value!r}")
    return float(value)


def parse_config(data: dict[str, Any], *, base_dir: Path | None = None) -> CoordinatorConfig:
    """Validate a parsed TOML document; raises :class:`ConfigFileError` or ``RuleError``."""
    base = base_dir or Path.cwd()
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise _err(f"unknown top-level key(s) {sorted(unknown)} (allowed: {sorted(_TOP_KEYS)})")
    coord = data.get("coordinator", {})
    ident = data.get("identity", {})
    if not isinstance(coord, dict) or not isinstance(ident, dict):
        raise _err("[coordinator] and [identity] must be tables")
    if set(coord) - _COORD_KEYS:
        raise _err(f"unknown key(s) in [coordinator]: {sorted(set(coord) - _COORD_KEYS)}")
    if set(ident) - _ID_KEYS:
        raise _err(f"unknown key(s) in [identity]: {sorted(set(ident) - _ID_KEYS)}")

    broker = coord.get("broker", "embedded")
    if isinstance(broker, list):         # broker failover: the transport takes "url1,url2"
        if not broker or not all(isinstance(u, str) and u.startswith(("mqtt://", "mqtts://"))
                                 and "," not in u for u in broker):
            raise _err(f"coordinator.broker as a list must hold mqtt:// or mqtts:// URLs, got {broker!r}")
        broker = ",".join(broker)
    if not isinstance(broker, str) or not (broker == "embedded" or "://" in broker):
        raise _err(f"coordinator.broker must be a URL (mqtt://host:port) or \"embedded\", got {broker!r}")
    durability = coord.get("durability", "normal")
    if durability not in ("normal", "full"):
        raise _err("coordinator.durability must be \"normal\" or \"full\"")
    port = coord.get("metrics_port", 0)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise _err("coordinator.metrics_port must be a port number (0 = off)")

    def path(value: Any, what: str) -> Path | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise _err(f"{what} must be a path string")
        p = Path(os.path.expanduser(value))
        return p if p.is_absolute() else base / p

    trust_raw = data.get("trust", [])
    if not isinstance(trust_raw, list):
        raise _err("[[trust]] must be an array of tables")
    trust = []
    for i, t in enumerate(trust_raw):
        if not isinstance(t, dict) or not isinstance(t.get("issuer"), str) or not t["issuer"]:
            raise _err(f"trust #{i + 1} needs 'issuer' (a DID)")
        if set(t) - {"issuer", "types"}:
            raise _err(f"unknown key(s) in trust #{i + 1}: {sorted(set(t) - {'issuer', 'types'})} "
                       "(top-level keys such as rules_file must come before the first table)")
        types = t.get("types", ["DeviceCredential"])
        if not isinstance(types, list) or not types or not all(isinstance(x, str) for x in types):
            raise _err(f"trust #{i + 1} 'types' must be a non-empty list of credential types")
        trust.append(TrustedIssuer(t["issuer"], tuple(types)))

    rules_raw = data.get("rules", [])
    if not isinstance(rules_raw, list):
        raise _err("[[rules]] must be an array of tables")
    rules_file = data.get("rules_file")
    if rules_file is not None:
        rp = path(rules_file, "rules_file")
        assert rp is not None
        rules_raw = [*rules_raw, *_read_toml(rp).get("rules", [])]
    rules = parse_rules(rules_raw)

    key = ident.get("key")
    if key is not None and not isinstance(key, str):
        raise _err("identity.key must be a private key multibase string")
    passphrase_env = str(ident.get("passphrase_env", "AUTOGLM_PASSPHRASE"))
    issuer = None if "issuer" not in data else _parse_issuer(
        data["issuer"], default_passphrase_env=passphrase_env, path=path)
    store_url = None if "store" not in data else _parse_store(data["store"], path=path)
    return CoordinatorConfig(
        broker=broker,
        data_dir=path(coord.get("data_dir", "coordinator-data"), "coordinator.data_dir") or base,
        heartbeat_ttl=_number(coord, "heartbeat_ttl", DEFAULT_HEARTBEAT_TTL, where="coordinator",
                              minimum=0.1),
        durability=durability,
        metrics_port=port,
        sweep_interval=_number(coord, "sweep_interval", 1.0, where="coordinator", minimum=0.01),
        status_republish=_number(coord, "status_republish", 0.0, where="coordinator", maximum=86400.0),
        name=str(coord.get("name", "coordinator")),
        keystore=path(ident.get("keystore"), "identity.keystore"),
        passphrase_env=passphrase_env,
        key_multibase=key,
        credential=path(ident.get("credential"), "identity.credential"),
        trust=tuple(trust),
        rules=rules,
        issuer=issuer,
        store_url=store_url,
        model=None if "model" not in data else parse_model_settings(data["model"], path=path),   # [model]
        ha=_parse_ha(data.get("ha", {}), store_url=store_url, broker=broker),
    )


def _read_toml(p: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise _err(f"cannot read {p}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise _err(f"{p} is not valid TOML: {exc}") from exc


def load_config(path: str | Path) -> CoordinatorConfig:
    """Read and validate a coordinator TOML file."""
    p = Path(path)
    data = _read_toml(p)
    return parse_config(data, base_dir=p.resolve().parent)


__all__ = ["CoordinatorConfig", "HAConfig", "IssuerConfig", "TrustedIssuer", "DEFAULT_HEARTBEAT_TTL", "load_config",
           "parse_config", "parse_duration"]
