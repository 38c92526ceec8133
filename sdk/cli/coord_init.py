"""``autoglm coordinator init DIR``: a working coordinator, its issuer and an admin operator in one step.

Writes into DIR: ``coordinator.toml`` (commented), ``rules.toml``, three keystores
(``coordinator.keystore``, ``issuer.keystore``, ``operator.keystore``, one passphrase), the
coordinator's ``coordinator-vc.json`` and the operator's admin ``operator-vc.json``, both issued by
the issuer; then adds an operator profile to ``$AUTOGLM_CONFIG_DIR/profiles.toml`` so that
``autoglm fleet ls`` finds everything.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_FILE = "coordinator.toml"
RULES_FILE = "rules.toml"
FILES = (CONFIG_FILE, RULES_FILE, "coordinator.keystore", "issuer.keystore", "operator.keystore",
         "coordinator-vc.json", "operator-vc.json")
OPERATOR_VALID_FOR = 365 * 86400.0

STARTER_RULES = '''\
# Adaptation rules (docs/COORDINATOR.md, "Rules"). Validated when the coordinator starts and on
# every reload: `kill -HUP <pid>` re-reads this file; a broken file keeps the rules in force.

# A display in a room announces a screen: the phones in the same room switch to a companion
# layout at that display's resolution.
[[rules]]
name = "phone-companion-layout"
event = "screen_available"

[rules.when]
"sender.kind" = "display"
"event.width" = { gte = 320 }

[rules.target]
select = "group"            # devices sharing a group with the sender...
group_prefix = "room:"      # ...a room group

[rules.target.where]
"device.kind" = "phone"

[rules.config]
"ui.layout" = "companion"
"ui.companion.resolution" = "{event.width}x{event.height}"
'''


def _config_text(*, broker: str, passphrase_env: str, issuer_did: str, coordinator_did: str,
                 operator_did: str) -> str:
    made = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return f'''\
# Open-AutoGLM coordinator, written by `autoglm coordinator init` ({made}).
#   run it:    autoglm coordinator -c {CONFIG_FILE}        (with ${passphrase_env} set)
#   operate:   autoglm fleet ls                            (the operator profile is already written)
# Reference: docs/COORDINATOR.md and docs/OPERATIONS.md. Relative paths start at this file's directory.
#   coordinator  {coordinator_did}
#   issuer       {issuer_did}
#   operator     {operator_did}  (admin)

# Top-level keys come before the first [table] (TOML scoping).
rules_file = "{RULES_FILE}"          # reloaded and validated on SIGHUP (kill -HUP <pid>)

[coordinator]
# "embedded://HOST:PORT" starts an in-process broker on that port (DID login, own-topics ACL);
# for Mosquitto give its URL instead: "mqtt://HOST:1883" or "mqtts://HOST:8883".
broker = "{broker}"
data_dir = "data"                  # SQLite state, status list, coordinator.lock (one daemon per dir)
heartbeat_ttl = 30                 # seconds of silence before a device counts as expired
durability = "normal"              # "full": fsync every commit (survives power loss)
metrics_port = 0                   # Prometheus /metrics on 127.0.0.1 (0 = off)

[identity]
keystore = "coordinator.keystore"  # the coordinator's DID key
passphrase_env = "{passphrase_env}"
credential = "coordinator-vc.json" # its CoordinatorCredential, shown to devices during the handshake

[issuer]
# The key this coordinator issues (and revokes) device credentials with; it also publishes the
# issuer's status list, so `autoglm fleet revoke` cuts a device off.
keystore = "issuer.keystore"       # same passphrase as [identity] unless passphrase_env is set here
credential_valid_for = "30d"       # devices renew by themselves at renew_after of this period
renew_after = 0.6667
manufacturer_approve = "manual"    # enrollment with a ManufacturerCredential: "auto" or "manual"

# Issuers whose credentials this coordinator accepts, and for which types.
[[trust]]
issuer = "{issuer_did}"
types = ["DeviceCredential", "OperatorCredential"]
'''


@dataclass
class InitResult:
    """What ``init`` wrote."""

    directory: Path
    config: Path
    profile: str
    profiles_file: Path
    coordinator: str
    issuer: str
    operator: str
    broker: str
    passphrase_env: str
    generated_passphrase: str | None = None
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"directory": str(self.directory), "config": str(self.config), "profile": self.profile,
                "profiles_file": str(self.profiles_file), "coordinator": self.coordinator,
                "issuer": self.issuer, "operator": self.operator, "broker": self.broker,
                "passphrase_env": self.passphrase_env, "generated_passphrase": self.generated_passphrase,
                "files": self.files,
                "next": [f"autoglm coordinator -c {self.config}", f"autoglm fleet ls --profile {self.profile}"]}


def client_url(broker: str) -> str:
    """The URL clients use for a config's broker: ``embedded://H:P`` → ``mqtt://H:P?protocol=3.1.1``
    (the embedded broker speaks MQTT 3.1.1; naming it saves the MQTT 5 probe on every connect)."""
    if broker.startswith("embedded://"):
        return "mqtt://" + broker[len("embedded://"):].rstrip("/") + "?protocol=3.1.1"
    return broker


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def init_directory(directory: Path, *, broker: str, passphrase: str | None, passphrase_env: str,
                   profile: str, force: bool = False, make_default: bool = True) -> InitResult:
    """Create the keys, credentials, config, rules and operator profile (see the module docstring)."""
    from sdk.cli.errors import CliError
    from sdk.cli.profiles import profiles_path, save_profile
    from sdk.coord.coordinator.auth import coordinator_credential, operator_credential
    from sdk.identity.keystore import Keystore

    directory = directory.expanduser().resolve()
    existing = [name for name in FILES if (directory / name).exists()]
    if existing and not force:
        raise CliError("already_initialized", f"{directory} already has {', '.join(existing)}",
                       hint="pick an empty directory, or pass --force to replace these files")
    directory.mkdir(parents=True, exist_ok=True)
    generated = None
    if not passphrase:
        generated = passphrase = secrets.token_urlsafe(18)
    keys = {}
    for name in ("coordinator", "issuer", "operator"):
        store = Keystore.create(directory / f"{name}.keystore", passphrase, overwrite=force)
        keys[name] = store.key
    coord, issuer, operator = keys["coordinator"], keys["issuer"], keys["operator"]
    _write_private(directory / "coordinator-vc.json",
                   json.dumps(coordinator_credential(issuer, coord.did), indent=2) + "\n")
    _write_private(directory / "operator-vc.json",
                   json.dumps(operator_credential(issuer, operator.did, roles=("admin",), name="admin",
                                                  valid_for=OPERATOR_VALID_FOR), indent=2) + "\n")
    (directory / RULES_FILE).write_text(STARTER_RULES, encoding="utf-8")
    config = directory / CONFIG_FILE
    config.write_text(_config_text(broker=broker, passphrase_env=passphrase_env, issuer_did=issuer.did,
                                   coordinator_did=coord.did, operator_did=operator.did), encoding="utf-8")
    settings = {"broker": client_url(broker), "coordinator": coord.did,
                "keystore": str(directory / "operator.keystore"),
                "credential": str(directory / "operator-vc.json"), "passphrase_env": passphrase_env}
    written = save_profile(profile, settings, make_default=make_default)
    return InitResult(directory=directory, config=config, profile=profile, profiles_file=written or profiles_path(),
                      coordinator=coord.did, issuer=issuer.did, operator=operator.did, broker=broker,
                      passphrase_env=passphrase_env, generated_passphrase=generated, files=list(FILES))


__all__ = ["InitResult", "init_directory", "client_url", "STARTER_RULES", "CONFIG_FILE"]
