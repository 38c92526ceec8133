"""Operator connection profiles: how ``autoglm fleet`` finds the broker, its key and the coordinator.

Each setting is resolved flag > environment variable > profile. Profiles live in
``$AUTOGLM_CONFIG_DIR/profiles.toml`` (default ``~/.config/autoglm/profiles.toml``)::

    default = "home"                 # the profile used without --profile / $AUTOGLM_PROFILE

    [profiles.home]
    broker = "mqtt://127.0.0.1:1883"
    coordinator = "did:key:z6Mk..."
    keystore = "/home/me/fleet/operator.keystore"
    credential = "/home/me/fleet/operator-vc.json"
    passphrase_env = "AUTOGLM_PASSPHRASE"   # the variable holding the keystore passphrase
    ca = "/etc/autoglm/ca.pem"              # optional TLS (mqtts://): CA, client cert and key
    cert = "..."
    key_file = "..."
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sdk.errors import AutoGLMError

CONFIG_DIR_ENV = "AUTOGLM_CONFIG_DIR"
PROFILE_ENV = "AUTOGLM_PROFILE"
DEFAULT_CONFIG_DIR = "~/.config/autoglm"
PROFILES_FILE = "profiles.toml"
DEFAULT_PROFILE = "default"
PASSPHRASE_ENV = "AUTOGLM_PASSPHRASE"

#: setting → environment variable (flags win over these, these over the profile)
ENV = {
    "broker": "AUTOGLM_BROKER",
    "keystore": "AUTOGLM_OPERATOR_KEYSTORE",
    "credential": "AUTOGLM_OPERATOR_CREDENTIAL",
    "coordinator": "AUTOGLM_COORDINATOR",
}
_KEYS = {"broker", "coordinator", "keystore", "credential", "passphrase_env", "ca", "cert", "key_file"}
_PATHS = {"keystore", "credential", "ca", "cert", "key_file"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ProfileError(AutoGLMError, ValueError):
    """A profile file or a setting is missing or wrong; ``reason`` is stable, ``hint`` says what to do."""

    reason = "invalid_profile"

    def __init__(self, message: str, *, reason: str, hint: str = "") -> None:
        super().__init__(message, reason=reason)
        self.hint = hint


@dataclass(frozen=True)
class Connection:
    """Everything an operator command needs to reach the coordinator."""

    broker: str
    coordinator: str
    keystore: Path
    credential: Path
    passphrase_env: str = PASSPHRASE_ENV
    ca: Path | None = None
    cert: Path | None = None
    key_file: Path | None = None
    profile: str | None = None


def config_dir() -> Path:
    """``$AUTOGLM_CONFIG_DIR``, else ``~/.config/autoglm``."""
    return Path(os.environ.get(CONFIG_DIR_ENV) or DEFAULT_CONFIG_DIR).expanduser()


def profiles_path() -> Path:
    return config_dir() / PROFILES_FILE


def read_profiles(path: Path | None = None) -> dict[str, Any]:
    """The parsed profiles file (``{}`` when there is none); a malformed file is a ProfileError."""
    p = path or profiles_path()
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ProfileError(f"cannot read {p}: {exc}", reason="profile_io") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{p} is not valid TOML: {exc}", reason="invalid_profile") from exc
    profiles = data.get("profiles", {})
    if not isinstance(profiles, dict) or not all(isinstance(v, dict) for v in profiles.values()):
        raise ProfileError(f"{p}: [profiles.NAME] must be tables", reason="invalid_profile")
    if "default" in data and not isinstance(data["default"], str):
        raise ProfileError(f"{p}: 'default' must be a profile name", reason="invalid_profile")
    for name, table in profiles.items():
        unknown = set(table) - _KEYS
        if unknown:
            raise ProfileError(f"{p}: unknown key(s) {sorted(unknown)} in profile {name!r} "
                               f"(allowed: {sorted(_KEYS)})", reason="invalid_profile")
        bad = [k for k, v in table.items() if not isinstance(v, str) or not v]
        if bad:
            raise ProfileError(f"{p}: profile {name!r}: {', '.join(sorted(bad))} must be non-empty strings",
                               reason="invalid_profile")
    return data


def load_profile(name: str | None = None, *, path: Path | None = None) -> tuple[str | None, dict[str, str]]:
    """The named profile (else ``$AUTOGLM_PROFILE``, the file's ``default``, or ``default``)."""
    data = read_profiles(path)
    profiles: dict[str, dict[str, str]] = data.get("profiles", {})
    chosen = name or os.environ.get(PROFILE_ENV) or data.get("default") or None
    if chosen is None:
        return (DEFAULT_PROFILE, profiles[DEFAULT_PROFILE]) if DEFAULT_PROFILE in profiles else (None, {})
    if chosen not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise ProfileError(f"no profile {chosen!r} in {path or profiles_path()} (profiles: {known})",
                           reason="unknown_profile",
                           hint="autoglm coordinator init DIR writes one; or pass --broker, --keystore, "
                                "--credential and --coordinator")
    return chosen, profiles[chosen]


def resolve(flags: dict[str, Any], *, profile: str | None = None, path: Path | None = None) -> Connection:
    """Settings from ``flags`` (None = not given), then the environment, then the profile."""
    name, table = load_profile(profile, path=path)
    values: dict[str, Any] = {}
    for f in fields(Connection):
        if f.name == "profile":
            continue
        value = flags.get(f.name)
        if value in (None, "") and f.name in ENV:
            value = os.environ.get(ENV[f.name]) or None
        if value in (None, ""):
            value = table.get(f.name)
        if value is not None and f.name in _PATHS:
            value = Path(os.path.expanduser(str(value)))
        if value is not None:
            values[f.name] = value
    missing = [k for k in ("broker", "coordinator", "keystore", "credential") if k not in values]
    if missing:
        flags_hint = ", ".join(f"--{k}" for k in missing)
        env_hint = ", ".join(f"${ENV[k]}" for k in missing)
        raise ProfileError(f"no {', '.join(missing)} for the operator connection",
                           reason="no_connection",
                           hint=f"run autoglm coordinator init DIR once (it writes a profile), "
                                f"or give {flags_hint} (or {env_hint})")
    return Connection(profile=name, **values)


def _toml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def save_profile(name: str, settings: dict[str, str], *, make_default: bool = False,
                 path: Path | None = None) -> Path:
    """Add or replace profile ``name`` (other profiles are kept); returns the file written."""
    if not _NAME.match(name):
        raise ProfileError(f"profile name {name!r}: use letters, digits, '.', '_' or '-'",
                           reason="invalid_profile")
    unknown = set(settings) - _KEYS
    if unknown:
        raise ProfileError(f"unknown profile key(s) {sorted(unknown)}", reason="invalid_profile")
    p = path or profiles_path()
    data = read_profiles(p)
    profiles: dict[str, dict[str, str]] = dict(data.get("profiles", {}))
    profiles[name] = {k: str(v) for k, v in settings.items() if v is not None}
    default = data.get("default")
    if make_default or default is None:
        default = name
    lines = ["# autoglm operator profiles (autoglm fleet --profile NAME); see docs/OPERATIONS.md", "",
             f"default = {_toml_str(default)}"]
    for pname in sorted(profiles):
        lines += ["", f"[profiles.{pname}]"]
        lines += [f"{k} = {_toml_str(v)}" for k, v in sorted(profiles[pname].items())]
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.chmod(tmp, 0o600)
    os.replace(tmp, p)
    return p


__all__ = ["Connection", "ENV", "ProfileError", "config_dir", "load_profile", "profiles_path", "read_profiles",
           "resolve", "save_profile"]
