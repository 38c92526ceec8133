"""``autoglm fleet``: operate a fleet through the coordinator's operator API.

Each command is one signed, authorized and audited ``coord.operate`` request (see
docs/OPERATIONS.md). Connection settings come from flags, then ``AUTOGLM_*`` variables, then a
profile (:mod:`sdk.cli.profiles`). ``--json`` prints ``{"ok": true, "result": ...}``, or on failure
``{"ok": false, "reason", "error": {"reason", "message", "hint"}}`` (:mod:`sdk.cli.errors`); without
it failures are ``error: <reason>: <message>`` plus a ``hint:`` line on stderr. Exit code 2 for
usage mistakes, 1 for runtime failures.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from sdk.cli.profiles import Connection

log = logging.getLogger(__name__)

fleet_app = typer.Typer(name="fleet", no_args_is_help=True,
                        help="Operate the fleet: query, inspect, set desired state, tag, call, revoke, enroll.")

#: the role each operation needs (the coordinator decides; this only words the hint)
OP_ROLES = {
    "fleet.query": "read", "device.show": "read",
    "desired.set": "write", "desired.unset": "write", "tags.set": "write", "device.call": "write",
    "device.revoke": "admin", "enroll.token": "admin", "enroll.pending": "admin", "enroll.approve": "admin",
    "enroll.deny": "admin", "audit.list": "admin",
}

#: reason → what to do about it
HINTS = {
    "not_authorized": "is your OperatorCredential issued by an issuer the coordinator trusts "
                      "([[trust]] types = [\"OperatorCredential\"]), unexpired and not revoked?",
    "forbidden": "{op} needs role {role}: ask an admin for an OperatorCredential with roles = [\"{role}\"]",
    "unknown_op": "the coordinator does not offer this operation (is it older than this CLI?)",
    "invalid_params": "the message names the field; see autoglm fleet COMMAND --help",
    "not_found": "no such device: list them with autoglm fleet ls",
    "ambiguous": "give more of the DID (autoglm fleet ls --wide shows them in full)",
    "offline": "the device is not connected: autoglm fleet show DID shows its presence and last_seen",
    "timeout": "no answer in time: is the coordinator running and reachable on this broker? "
               "(raise --request-timeout, or --timeout for fleet call)",
    "no_such_method": "the device registered no handler for this method",
    "handler_error": "the device's handler failed; its log says why",
    "not_issuer": "the coordinator has no [issuer] section: add one to coordinator.toml and restart it",
    "token_used": "make a new one with autoglm fleet token",
    "token_expired": "make a new one with autoglm fleet token",
    "busy": "the coordinator is shedding load: retry in a moment",
    "connect_failed": "is the broker running at that URL? (--broker, $AUTOGLM_BROKER or the profile)",
    "connect_timeout": "is the broker running at that URL? (--broker, $AUTOGLM_BROKER or the profile)",
    "bad_proof": "the broker refused the DID proof: check the machine's clock and the broker's auth mode",
    "no_passphrase": "set {passphrase_env} to the operator keystore's passphrase",
    "wrong_passphrase": "{passphrase_env} does not open the operator keystore",
    "keystore_not_found": "check --keystore, $AUTOGLM_OPERATOR_KEYSTORE or the profile's keystore",
    "credential_not_found": "check --credential, $AUTOGLM_OPERATOR_CREDENTIAL or the profile's credential",
    "missing_extra": "install the extra the message names",
}

#: reasons that are the caller's mistake on the command line (exit code 2)
USAGE_REASONS = {"invalid_option", "no_connection", "unknown_profile", "invalid_profile", "ambiguous"}

_FULL_DID = re.compile(r"^did:[a-z0-9]+:[A-Za-z0-9._:%-]{16,}$")
_DID_KEY = re.compile(r"^did:key:z[1-9A-HJ-NP-Za-km-z]{46,}$")
MAX_LIMIT = 1000
MAX_AUDIT = 500
SHOW_VERSIONS = 20         # set/unset print this many new versions (--json: all)
MAX_CALL_TIMEOUT = 60.0
PAGE_CAP = 10_000          # --all stops after this many pages (a cursor loop cannot run forever)


def failure(reason: str, message: str, hint: str = "") -> Exception:
    """A fleet command's own failure (a :class:`sdk.cli.errors.CliError`; usage reasons exit 2)."""
    from sdk.cli.errors import CliError

    return CliError(reason, message, hint=hint or None, usage=reason in USAGE_REASONS)


def _usage(message: str, hint: str = "") -> Exception:
    return failure("invalid_option", message, hint)


# -- output -----------------------------------------------------------------------------------


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False, emoji=False, soft_wrap=False)


def _esc(value: Any) -> str:
    from rich.markup import escape

    return escape(str(value))


def _hint(reason: str, *, op: str | None = None, message: str = "", passphrase_env: str = "") -> str:
    template = HINTS.get(reason, "")
    if reason == "forbidden":
        named = re.search(r"\b(read|write|admin)\b", message)
        role = named.group(1) if named else OP_ROLES.get(op or "", "a higher")
        return template.format(op=op or "this operation", role=role)
    return template.format(passphrase_env=f"${passphrase_env or 'AUTOGLM_PASSPHRASE'}")


@dataclass
class _Context:
    """What the error guard needs to word a hint."""

    op: str | None = None
    passphrase_env: str = ""


@contextmanager
def _guard(as_json: bool, ctx: _Context) -> Iterator[None]:
    """Every failure becomes one line plus a hint (exit 2 usage, 1 runtime), never a traceback.

    The CLI-wide guard (:mod:`sdk.cli.errors`) prints it; this one only words the operator
    API's reasons (``forbidden`` names the role the operation needs)."""
    from sdk.cli.errors import CliError, guard
    from sdk.errors import AutoGLMError

    with guard(as_json=as_json):
        try:
            yield
        except AutoGLMError as exc:
            hint = getattr(exc, "hint", "") or _hint(exc.reason, op=ctx.op, message=str(exc),
                                                     passphrase_env=ctx.passphrase_env)
            if not hint and exc.reason not in USAGE_REASONS:
                raise
            raise CliError(exc.reason, str(exc), hint=hint or None,
                           usage=exc.reason in USAGE_REASONS) from exc


def _print_json(result: Any) -> None:
    typer.echo(json.dumps({"ok": True, "result": result}, indent=2, default=str))


def _ago(value: Any, now: float | None = None) -> str:
    """``12s ago`` / ``in 3d`` for epoch seconds; other values as they are."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    delta = (now if now is not None else time.time()) - float(value)
    ahead = delta < 0
    delta = abs(delta)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m"), (1, "s")):
        if delta >= size or unit == "s":
            text = f"{int(delta // size)}{unit}"
            break
    return f"in {text}" if ahead else f"{text} ago"


def short_did(did: str, wide: bool = False) -> str:
    """``did:key:z6MkhaXgBZDvotDk…`` (20 characters of the key: enough to select it again)."""
    if wide or not isinstance(did, str) or not did.startswith("did:key:") or len(did) < 40:
        return str(did)
    return did[len("did:key:"):][:20] + "…"


def devices_table(devices: list[dict[str, Any]], *, total: int | None = None, wide: bool = False,
                  now: float | None = None) -> Any:
    """The ``fleet ls`` table: fits 80 columns with short DIDs."""
    from rich.table import Table

    title = f"devices ({len(devices)}" + (f" of {total})" if total is not None and total != len(devices) else ")")
    table = Table(title=title, title_justify="left", pad_edge=False, box=None, header_style="bold")
    table.add_column("did", no_wrap=not wide, overflow="fold")
    table.add_column("kind", max_width=10, overflow="ellipsis", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("groups/tags", max_width=22, overflow="fold")
    table.add_column("ver", justify="right", no_wrap=True)
    table.add_column("seen", no_wrap=True)
    for d in devices:
        labels = [*d.get("groups", []), *(f"#{t}" for t in d.get("tags", []))]
        desired, reported = d.get("desired_version"), d.get("reported_version")
        mark = "" if d.get("converged", desired == reported) else "*"
        ver = f"{reported if reported is not None else '-'}/{desired if desired is not None else '-'}{mark}"
        table.add_row(_esc(short_did(d.get("did", ""), wide)), _esc(d.get("kind", "")), _esc(d.get("state", "")),
                      _esc(",".join(labels)), ver, _esc(_ago(d.get("last_seen"), now)))
    return table


# -- argument parsing -------------------------------------------------------------------------


def _json_arg(text: str, what: str) -> Any:
    from sdk.identity.hazmat.json import loads

    try:
        return loads(text)
    except ValueError as exc:
        raise _usage(f"{what} is not valid JSON: {exc}", f"quote it for the shell, e.g. {what} "
                     "'{\"kind\": \"phone\"}'") from None


def _json_object(text: str, what: str) -> dict[str, Any]:
    value = _json_arg(text, what)
    if not isinstance(value, dict):
        raise _usage(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def parse_value(text: str) -> Any:
    """A value on the command line: JSON when it parses (``3``, ``true``, ``{"a":1}``), else the text."""
    from sdk.identity.hazmat.json import loads

    try:
        return loads(text)
    except ValueError:
        return text


def parse_assignments(items: list[str], *, what: str = "KEY=VALUE") -> dict[str, Any]:
    """``["ui.layout=v3", "level=3"]`` → ``{"ui.layout": "v3", "level": 3}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _usage(f"expected {what}, got {item!r}", "e.g. ui.layout=v3 or brightness=0.8")
        out[key.strip()] = parse_value(value)
    return out


def parse_target(text: str | None, where: str | None) -> dict[str, Any]:
    """A DID, ``group:NAME``, ``tag:NAME``, or ``--where JSON`` → the operator API's target."""
    if where is not None:
        if text is not None:
            raise _usage("give a TARGET or --where, not both")
        return {"where": _json_object(where, "--where")}
    if not text:
        raise _usage("no TARGET", "a DID, group:NAME, tag:NAME, or --where JSON")
    for prefix in ("group", "tag"):
        if text.startswith(prefix + ":"):
            name = text[len(prefix) + 1:]
            if not name:
                raise _usage(f"{prefix}: needs a name, e.g. {prefix}:room:living")
            return {prefix: name}
    return {"did": text}


def _version_filter(value: str, what: str) -> int | dict[str, int]:
    """``3`` → 3; ``lt:3`` / ``<3`` / ``ge:2`` → ``{"lt": 3}``..."""
    ops = {"<=": "le", ">=": "ge", "<": "lt", ">": "gt", "=": "eq"}
    text = value.strip()
    for sym, name in ops.items():
        if text.startswith(sym):
            text = f"{name}:{text[len(sym):]}"
            break
    op, sep, num = text.partition(":")
    if not sep:
        op, num = "eq", op
    if op not in ("lt", "le", "gt", "ge", "eq") or not num.strip().isdigit():
        raise _usage(f"{what} wants N, or lt:N / le:N / gt:N / ge:N (or <N, >=N...), got {value!r}")
    n = int(num)
    return n if op == "eq" else {op: n}


def build_where(*, kind: str | None = None, group: str | None = None, tag: str | None = None,
                capability: str | None = None, presence: str | None = None, credential: str | None = None,
                version_lt: int | None = None, desired_version: str | None = None,
                reported_version: str | None = None, converged: bool | None = None,
                state: list[str] | None = None, reported: list[str] | None = None,
                attr: list[str] | None = None, did_prefix: str | None = None,
                where: str | None = None) -> dict[str, Any]:
    """The ``fleet.query`` ``where`` from ``fleet ls`` flags (``--where`` JSON first, flags on top)."""
    out: dict[str, Any] = _json_object(where, "--where") if where else {}
    if presence is not None and presence not in PRESENCE:
        raise _usage(f"--presence must be one of {', '.join(PRESENCE)}, got {presence!r}")
    if credential is not None and credential not in CREDENTIAL_STATES:
        raise _usage(f"--credential-state must be one of {', '.join(CREDENTIAL_STATES)}, got {credential!r}")
    simple = {"kind": kind, "group": group, "tag": tag, "capability": capability, "presence": presence,
              "credential": credential, "did_prefix": did_prefix, "converged": converged}
    out.update({k: v for k, v in simple.items() if v is not None})
    if version_lt is not None:
        if version_lt < 0:
            raise _usage("--version-lt must be >= 0")
        out["reported_version"] = {"lt": version_lt}
    if desired_version is not None:
        out["desired_version"] = _version_filter(desired_version, "--desired-version")
    if reported_version is not None:
        out["reported_version"] = _version_filter(reported_version, "--reported-version")
    for name, items in (("state", state), ("reported", reported), ("attributes", attr)):
        if items:
            out[name] = {**out.get(name, {}), **parse_assignments(items)}
    return out


PRESENCE = ("online", "offline", "expired", "revoked")
CREDENTIAL_STATES = ("valid", "expiring", "expired", "revoked")
APPROVE_MODES = ("auto", "manual")


# -- the connection ---------------------------------------------------------------------------


@dataclass
class ConnOptions:
    """The connection flags every fleet command takes."""

    profile: str | None = None
    broker: str | None = None
    keystore: Path | None = None
    credential: Path | None = None
    coordinator: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key_file: Path | None = None
    request_timeout: float = 10.0

    def resolve(self) -> Connection:
        """Flags, then the environment, then the profile; checked before anything connects."""
        from sdk.cli import options
        from sdk.cli.profiles import resolve

        if not 0 < self.request_timeout <= 600:
            raise _usage("--request-timeout must be between 0 and 600 seconds")
        flags = {"broker": self.broker, "keystore": self.keystore, "credential": self.credential,
                 "coordinator": self.coordinator, "ca": self.ca, "cert": self.cert, "key_file": self.key_file}
        conn = resolve(flags, profile=self.profile)
        options.broker_url(conn.broker)
        if (conn.cert is None) != (conn.key_file is None):
            raise _usage("--cert and --key-file go together (the TLS client certificate and its key)")
        return conn


Body = Callable[[Any], Awaitable[Any]]


def transport_options(conn: Connection, key: Any) -> dict[str, Any]:
    """Broker login by DID proof, plus TLS when CA or client certificate files are given."""
    from sdk.messaging.broker_auth import did_credentials

    options: dict[str, Any] = dict(did_credentials(key))
    if conn.ca or conn.cert or conn.key_file:
        from sdk.messaging.transport import TLSConfig

        options["tls"] = TLSConfig(ca_file=str(conn.ca) if conn.ca else None,
                                   cert_file=str(conn.cert) if conn.cert else None,
                                   key_file=str(conn.key_file) if conn.key_file else None)
    return options


async def _session(conn: Connection, body: Body) -> Any:
    import os

    from sdk.coord.operator import OperatorClient
    from sdk.identity import load_credential
    from sdk.identity.keystore import KeystoreError, load_key

    secret = os.environ.get(conn.passphrase_env)
    if not secret:
        raise KeystoreError(f"${conn.passphrase_env} is not set (the operator keystore's passphrase)",
                            reason="no_passphrase")
    key = load_key(conn.keystore, passphrase=secret)
    credential = load_credential(conn.credential)
    if not isinstance(credential, dict):
        raise failure("invalid_credential", f"{conn.credential}: the OperatorCredential must be a JSON "
                      "credential (eddsa-jcs-2022), not a VC-JWT", "autoglm coordinator init writes one")
    async with OperatorClient(conn.broker, key, credential, coordinator=conn.coordinator,
                              **transport_options(conn, key)) as op:
        return await body(op)


def _run(opts: ConnOptions, as_json: bool, op_name: str, body: Body,
         render: Callable[[Any], None] | None = None) -> Any:
    """Resolve the connection, run ``body(operator_client)`` and print its result."""
    import asyncio

    ctx = _Context(op=op_name)
    with _guard(as_json, ctx):
        conn = opts.resolve()
        ctx.passphrase_env = conn.passphrase_env
        result = asyncio.run(_session(conn, body))
    if as_json:
        _print_json(result)
    elif render is not None:
        render(result)
    else:
        typer.echo(json.dumps(result, indent=2, default=str))
    return result


def _call(name: str, params: dict[str, Any], timeout: float) -> Body:
    async def body(op: Any) -> Any:
        return await op.call(name, params, timeout=timeout)
    return body


async def resolve_did(op: Any, text: str, timeout: float) -> str:
    """A full DID as given, else the one device whose DID starts with it (``z6Mk...`` or ``did:key:...``)."""
    if _FULL_DID.match(text) and (not text.startswith("did:key:") or _DID_KEY.match(text)):
        return text
    prefix = text if text.startswith("did:") else f"did:key:{text}"
    found = await op.call("fleet.query", {"where": {"did_prefix": prefix}, "limit": 2}, timeout=timeout)
    dids = [d.get("did") for d in found.get("devices", [])] if isinstance(found, dict) else []
    if not dids:
        raise failure("not_found", f"no device DID starts with {prefix}", HINTS["not_found"])
    if len(dids) > 1:
        raise failure("ambiguous", f"more than one device DID starts with {prefix}", HINTS["ambiguous"])
    return str(dids[0])


# -- shared options ---------------------------------------------------------------------------

ProfileOpt = typer.Option(None, "--profile", "-p", help="Profile in $AUTOGLM_CONFIG_DIR/profiles.toml "
                          "(default: $AUTOGLM_PROFILE, else the file's default)")
BrokerOpt = typer.Option(None, "--broker", help="Broker URL (else $AUTOGLM_BROKER, else the profile)")
KeystoreOpt = typer.Option(None, "--keystore", help="Operator keystore (else $AUTOGLM_OPERATOR_KEYSTORE)")
CredentialOpt = typer.Option(None, "--credential",
                             help="Operator's OperatorCredential file (else $AUTOGLM_OPERATOR_CREDENTIAL)")
CoordinatorOpt = typer.Option(None, "--coordinator", help="Coordinator DID (else $AUTOGLM_COORDINATOR)")
CaOpt = typer.Option(None, "--ca", help="TLS CA bundle (mqtts://)")
CertOpt = typer.Option(None, "--cert", help="TLS client certificate (with --key-file)")
KeyFileOpt = typer.Option(None, "--key-file", help="TLS client private key")
RequestTimeoutOpt = typer.Option(10.0, "--request-timeout", help="Seconds to wait for the coordinator")
JsonOpt = typer.Option(False, "--json", help="Results and errors as JSON on stdout")


def _opts(profile: str | None, broker: str | None, keystore: Path | None, credential: Path | None,
          coordinator: str | None, ca: Path | None, cert: Path | None, key_file: Path | None,
          request_timeout: float) -> ConnOptions:
    return ConnOptions(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)


def _early(as_json: bool, fn: Callable[[], Any]) -> Any:
    """Validate arguments before connecting (same error format)."""
    with _guard(as_json, _Context()):
        return fn()


# -- commands ---------------------------------------------------------------------------------


@fleet_app.command("ls")
def fleet_ls(
    kind: str | None = typer.Option(None, "--kind", help="Device kind"),
    group: str | None = typer.Option(None, "--group", help="Credential group or operator tag"),
    tag: str | None = typer.Option(None, "--tag", help="Operator tag"),
    capability: str | None = typer.Option(None, "--capability", help="Announced capability"),
    presence: str | None = typer.Option(None, "--presence", help="online | offline | expired | revoked"),
    credential_state: str | None = typer.Option(None, "--credential-state",
                                                help="valid | expiring | expired | revoked"),
    version_lt: int | None = typer.Option(None, "--version-lt", help="Reported version below N"),
    desired_version: str | None = typer.Option(None, "--desired-version", help="N, or lt:N / ge:N ..."),
    reported_version: str | None = typer.Option(None, "--reported-version", help="N, or lt:N / ge:N ..."),
    converged: bool | None = typer.Option(None, "--converged/--not-converged",
                                          help="Reported version equals (or not) the desired one"),
    state: list[str] | None = typer.Option(None, "--state", help="Desired state KEY=VALUE (repeatable)"),
    reported: list[str] | None = typer.Option(None, "--reported", help="Reported property KEY=VALUE"),
    attr: list[str] | None = typer.Option(None, "--attr", help="Announced attribute KEY=VALUE"),
    did_prefix: str | None = typer.Option(None, "--did-prefix", help="DIDs starting with this"),
    where: str | None = typer.Option(None, "--where", help="Raw fleet.query where JSON (flags add to it)"),
    limit: int = typer.Option(100, "--limit", help=f"Devices per page (1..{MAX_LIMIT})"),
    cursor: str | None = typer.Option(None, "--cursor", help="Continue from a previous page's next_cursor"),
    all_pages: bool = typer.Option(False, "--all", help="Follow the cursor to the last page"),
    count: bool = typer.Option(False, "--count", help="Only the number of matching devices"),
    wide: bool = typer.Option(False, "--wide", help="Full DIDs in the table"),
    profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
    credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
    ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
    request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
) -> None:
    """List devices matching the filters (all of them ANDed)."""
    def params() -> dict[str, Any]:
        if not 1 <= limit <= MAX_LIMIT:
            raise _usage(f"--limit must be between 1 and {MAX_LIMIT}, got {limit}")
        if all_pages and cursor:
            raise _usage("--all starts at the first page; drop --cursor")
        w = build_where(kind=kind, group=group, tag=tag, capability=capability, presence=presence,
                        credential=credential_state, version_lt=version_lt, desired_version=desired_version,
                        reported_version=reported_version, converged=converged, state=state,
                        reported=reported, attr=attr, did_prefix=did_prefix, where=where)
        p: dict[str, Any] = {"where": w, "limit": limit}
        if count:
            p["count"] = True
        elif cursor:
            p["cursor"] = cursor
        return p

    base = _early(as_json, params)
    opts = _opts(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)

    async def body(op: Any) -> Any:
        page = await op.call("fleet.query", base, timeout=request_timeout)
        if count or not all_pages:
            return page
        devices = list(page.get("devices", []))
        pages = 1
        while page.get("next_cursor") and pages < PAGE_CAP:
            page = await op.call("fleet.query", {**base, "cursor": page["next_cursor"]}, timeout=request_timeout)
            devices.extend(page.get("devices", []))
            pages += 1
        return {"total": page.get("total", len(devices)), "devices": devices, "next_cursor": page.get("next_cursor")}

    def render(result: dict[str, Any]) -> None:
        console = _console()
        if count:
            console.print(str(result.get("total", 0)))
            return
        console.print(devices_table(result.get("devices", []), total=result.get("total"), wide=wide))
        if result.get("next_cursor"):
            console.print(f"more: --cursor {_esc(result['next_cursor'])}  (or --all)")

    _run(opts, as_json, "fleet.query", body, render)


def _kv_lines(console: Any, title: str, value: Any) -> None:
    if value in (None, {}, []):
        console.print(f"[bold]{title}[/bold]: -")
        return
    console.print(f"[bold]{title}[/bold]:")
    if isinstance(value, dict):
        for k in sorted(value):
            console.print(f"  {_esc(k)} = {_esc(json.dumps(value[k], default=str))}")
    else:
        console.print(f"  {_esc(json.dumps(value, default=str))}")


def _short_source(rule: Any) -> str:
    """``operator:did:key:z6Mk...`` → ``operator:z6Mk…`` (rule names stay as they are)."""
    text = str(rule)
    prefix, _, did = text.partition(":")
    return f"{prefix}:{short_did(did)}" if prefix == "operator" and did.startswith("did:") else text


def render_device(d: dict[str, Any]) -> None:
    """``fleet show``: identity, presence, credential, desired/reported/delta, recent history."""
    from rich.table import Table

    console = _console()
    console.print(f"[bold]{_esc(d.get('did', ''))}[/bold]")
    rows = [("kind", d.get("kind")), ("name", d.get("name")), ("groups", ", ".join(d.get("groups", []))),
            ("tags", ", ".join(d.get("tags", []))), ("capabilities", ", ".join(d.get("capabilities", []))),
            ("presence", d.get("presence")), ("last seen", _ago(d.get("last_seen"))),
            ("versions", f"desired {d.get('desired_version')}, reported {d.get('reported_version')} "
                         f"({d.get('report_status') or '-'})")]
    cred = d.get("credential") or {}
    if cred:
        until = cred.get("valid_until")
        ends = f", expires {_ago(until)}" if isinstance(until, (int, float)) else (f", until {until}" if until else "")
        rows.append(("credential", f"{cred.get('status', '?')}{ends}"))
        rows.append(("issuer", cred.get("issuer")))
    for k, v in rows:
        console.print(f"{k:>13}: {_esc(v if v not in (None, '') else '-')}")
    _kv_lines(console, "attributes", d.get("attributes"))
    _kv_lines(console, "desired", d.get("desired"))
    _kv_lines(console, "reported properties", d.get("properties"))
    _kv_lines(console, "delta", d.get("delta"))
    history = d.get("history") or []
    if history:
        table = Table(title="history", title_justify="left", box=None, pad_edge=False, header_style="bold")
        for col in ("ver", "source", "changes", "created"):
            table.add_column(col, overflow="fold")
        for h in history:
            made_by = [_short_source(r) for r in h.get("rules") or []] or [str(h.get("source") or "")]
            table.add_row(str(h.get("version", "")), _esc(",".join(made_by)),
                          _esc(json.dumps(h.get("changes", {}), default=str)), _esc(_ago(h.get("created"))))
        console.print(table)


@fleet_app.command("show")
def fleet_show(
    did: str = typer.Argument(..., help="Device DID (or the start of it, as fleet ls prints it)"),
    profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
    credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
    ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
    request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
) -> None:
    """One device in detail: desired, reported, delta, history, presence, credential."""
    opts = _opts(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)

    async def body(op: Any) -> Any:
        full = await resolve_did(op, did, request_timeout)
        return await op.call("device.show", {"did": full}, timeout=request_timeout)

    _run(opts, as_json, "device.show", body, render_device)


def _target_body(op_name: str, target_text: str | None, where: str | None, extra: dict[str, Any],
                 timeout: float) -> Body:
    target = parse_target(target_text, where)

    async def body(op: Any) -> Any:
        t = dict(target)
        if "did" in t:
            t["did"] = await resolve_did(op, t["did"], timeout)
        return await op.call(op_name, {"target": t, **extra}, timeout=timeout)
    return body


def _render_count(verb: str) -> Callable[[Any], None]:
    def render(result: dict[str, Any]) -> None:
        console = _console()
        console.print(f"{verb} {result.get('count', 0)} device(s)")
        versions = sorted((result.get("versions") or {}).items())
        for did, version in versions[:SHOW_VERSIONS]:
            console.print(f"  {_esc(did)} -> version {version}")
        if len(versions) > SHOW_VERSIONS:
            console.print(f"  ... and {len(versions) - SHOW_VERSIONS} more (--json lists them all)")
    return render


@fleet_app.command("set")
def fleet_set(
    args: list[str] = typer.Argument(..., help="TARGET (DID, group:NAME, tag:NAME; omit with --where) "
                                     "then KEY=VALUE... (VALUE is JSON if it parses, else text)"),
    where: str | None = typer.Option(None, "--where", help="Target the devices a fleet.query where selects"),
    profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
    credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
    ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
    request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
) -> None:
    """Set desired-state keys; each device gets a new signed config version."""
    def prepare() -> Body:
        target, items = (None, args) if where is not None else (args[0], args[1:])
        changes = parse_assignments(items)
        if not changes:
            raise _usage("no KEY=VALUE to set", "e.g. autoglm fleet set group:room:living ui.layout=v4")
        return _target_body("desired.set", target, where, {"changes": changes}, request_timeout)

    body = _early(as_json, prepare)
    opts = _opts(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)
    _run(opts, as_json, "desired.set", body, _render_count("set on"))


@fleet_app.command("unset")
def fleet_unset(
    args: list[str] = typer.Argument(..., help="TARGET (omit with --where) then KEY..."),
    where: str | None = typer.Option(None, "--where", help="Target the devices a fleet.query where selects"),
    profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
    credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
    ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
    request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
) -> None:
    """Remove keys from the desired state of the target devices."""
    def prepare() -> Body:
        target, keys = (None, args) if where is not None else (args[0], args[1:])
        if not keys:
            raise _usage("no KEY to unset", "e.g. autoglm fleet unset DID ui.companion.resolution")
        bad = [k for k in keys if "=" in k or not k.strip()]
        if bad:
            raise _usage(f"unset takes key names, got {bad[0]!r}")
        return _target_body("desired.unset", target, where, {"keys": keys}, request_timeout)

    body = _early(as_json, prepare)
    opts = _opts(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)
    _run(opts, as_json, "desired.unset", body, _render_count("unset on"))


@fleet_app.command("tag")
def fleet_tag(
    target: str | None = typer.Argument(None, help="DID, group:NAME, tag:NAME (omit with --where)"),
    add: list[str] | None = typer.Option(None, "--add", help="Tag to add (repeatable)"),
    remove: list[str] | None = typer.Option(None, "--remove", help="Tag to remove (repeatable)"),
    where: str | None = typer.Option(None, "--where", help="Target the devices a fleet.query where selects"),
    profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
    credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
    ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
    request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
) -> None:
    """Add or remove operator tags (usable in rules and queries; no credential re-issue)."""
    def prepare() -> Body:
        if not add and not remove:
            raise _usage("nothing to do: give --add TAG and/or --remove TAG")
        return _target_body("tags.set", target, where, {"add": list(add or []), "remove": list(remove or [])},
                            request_timeout)

    body = _early(as_json, prepare)
    opts = _opts(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)
    _run(opts, as_json, "tags.set", body, _render_count("tagged"))


@fleet_app.command("call")
def fleet_call(
    did: str = typer.Argument(..., help="Device DID (or its start)"),
    method: str = typer.Argument(..., help="Method the device registered"),
    args_json: str | None = typer.Option(None, "--args", help="Arguments as a JSON object"),
    timeout: float = typer.Option(10.0, "--timeout", help=f"Seconds the device may take (<= {MAX_CALL_TIMEOUT:g})"),
    profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
    credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
    ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
    request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
) -> None:
    """Call a method on one device and print its result."""
    def prepare() -> dict[str, Any]:
        if not 0 < timeout <= MAX_CALL_TIMEOUT:
            raise _usage(f"--timeout must be between 0 and {MAX_CALL_TIMEOUT:g} seconds, got {timeout:g}")
        if not method.strip():
            raise _usage("METHOD is empty")
        return _json_object(args_json, "--args") if args_json else {}

    call_args = _early(as_json, prepare)
    wait = max(request_timeout, timeout + 5.0)
    opts = _opts(profile, broker, keystore, credential, coordinator, ca, cert, key_file, wait)

    async def body(op: Any) -> Any:
        full = await resolve_did(op, did, request_timeout)
        return await op.call("device.call", {"did": full, "method": method, "args": call_args,
                                             "timeout": timeout}, timeout=wait)

    def render(result: dict[str, Any]) -> None:
        typer.echo(json.dumps(result.get("result") if isinstance(result, dict) else result, indent=2, default=str))

    _run(opts, as_json, "device.call", body, render)


@fleet_app.command("revoke")
def fleet_revoke(
    did: str = typer.Argument(..., help="Device DID (or its start)"),
    reason: str = typer.Option(..., "--reason", help="Why (recorded in the audit log)"),
    profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
    credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
    ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
    request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
) -> None:
    """Revoke a device's credential: its status bit flips, the list is published, it is cut off."""
    def check() -> None:
        if not reason.strip():
            raise _usage("--reason is empty", "say why, e.g. --reason \"phone stolen\"")

    _early(as_json, check)
    opts = _opts(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)

    async def body(op: Any) -> Any:
        full = await resolve_did(op, did, request_timeout)
        return await op.call("device.revoke", {"did": full, "reason": reason}, timeout=request_timeout)

    def render(result: dict[str, Any]) -> None:
        published = "published" if result.get("published") else "NOT published"
        typer.echo(f"revoked {result.get('did')} (status indexes {result.get('revoked')}, list {published})")

    _run(opts, as_json, "device.revoke", body, render)


@fleet_app.command("token")
def fleet_token(
    kind: str = typer.Option(..., "--kind", help="Kind of the devices that enroll with it"),
    groups: list[str] | None = typer.Option(None, "--group", help="Group for their credentials (repeatable)"),
    uses: int = typer.Option(1, "--uses", help="How many devices may enroll with it"),
    ttl: float = typer.Option(3600.0, "--ttl", help="Seconds the token stays usable"),
    approve: str = typer.Option("auto", "--approve", help="auto | manual (held for fleet approve)"),
    valid_for: float | None = typer.Option(None, "--valid-for",
                                           help="Validity of the issued credentials in seconds "
                                                "(default: the coordinator's [issuer] setting)"),
    profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
    credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
    ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
    request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
) -> None:
    """Make a one-time enrollment token (a device presents it to get its DeviceCredential)."""
    def prepare() -> dict[str, Any]:
        if approve not in APPROVE_MODES:
            raise _usage(f"--approve must be auto or manual, got {approve!r}")
        if not 1 <= uses <= 100_000:
            raise _usage(f"--uses must be between 1 and 100000, got {uses}")
        if not 1 <= ttl <= 30 * 86400:
            raise _usage(f"--ttl must be between 1 s and 30 days, got {ttl:g}")
        if not kind.strip():
            raise _usage("--kind is empty")
        p: dict[str, Any] = {"kind": kind, "groups": list(groups or []), "uses": uses, "ttl": ttl,
                             "approve": approve}
        if valid_for is not None:
            if not 60 <= valid_for <= 10 * 365 * 86400:
                raise _usage(f"--valid-for must be between 60 s and 10 years, got {valid_for:g}")
            p["valid_for"] = valid_for
        return p

    params = _early(as_json, prepare)
    opts = _opts(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)

    def render(result: dict[str, Any]) -> None:
        typer.echo(str(result.get("token")))
        typer.echo(f"expires {_ago(result.get('expires'))}; uses {uses}; approval {approve}", err=True)

    _run(opts, as_json, "enroll.token", _call("enroll.token", params, request_timeout), render)


@fleet_app.command("pending")
def fleet_pending(
    profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
    credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
    ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
    request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
) -> None:
    """Enrollment requests waiting for fleet approve / fleet deny."""
    from rich.table import Table

    opts = _opts(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)

    def render(result: dict[str, Any]) -> None:
        table = Table(title=f"pending enrollments ({len(result.get('requests', []))})", title_justify="left",
                      box=None, pad_edge=False, header_style="bold")
        for col in ("id", "did", "kind", "via", "at"):
            table.add_column(col, overflow="fold")
        for r in result.get("requests", []):
            table.add_row(_esc(r.get("id", "")), _esc(r.get("did", "")), _esc(r.get("kind", "")),
                          _esc(r.get("via", "")), _esc(_ago(r.get("at"))))
        _console().print(table)

    _run(opts, as_json, "enroll.pending", _call("enroll.pending", {}, request_timeout), render)


def _decision(op_name: str, verb: str, doc: str) -> Callable[..., None]:
    def command(
        request: str = typer.Argument(..., help="Request id (from fleet pending) or the device's DID"),
        profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
        credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
        ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
        request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
    ) -> None:
        params: dict[str, Any] = {"did": request} if request.startswith("did:") else {"id": request}
        opts = _opts(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)

        def render(result: dict[str, Any]) -> None:
            typer.echo(f"{verb} {result.get('did', request)}")

        _run(opts, as_json, op_name, _call(op_name, params, request_timeout), render)

    command.__doc__ = doc
    return command


fleet_app.command("approve")(_decision("enroll.approve", "approved",
                                       "Approve a pending enrollment: the device receives its credential."))
fleet_app.command("deny")(_decision("enroll.deny", "denied", "Deny a pending enrollment request."))


@fleet_app.command("audit")
def fleet_audit(
    limit: int = typer.Option(50, "--limit", help=f"Newest entries to show (1..{MAX_AUDIT})"),
    operator: str | None = typer.Option(None, "--operator", help="Only this operator DID"),
    op_filter: str | None = typer.Option(None, "--op", help="Only this operation (e.g. device.revoke)"),
    profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
    credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
    ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
    request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
) -> None:
    """The audit log: who did what, when, with which outcome."""
    from rich.table import Table

    def prepare() -> dict[str, Any]:
        if not 1 <= limit <= MAX_AUDIT:
            raise _usage(f"--limit must be between 1 and {MAX_AUDIT}, got {limit}")
        p: dict[str, Any] = {"limit": limit}
        if operator:
            p["operator"] = operator
        if op_filter:
            p["op"] = op_filter
        return p

    params = _early(as_json, prepare)
    opts = _opts(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)

    def render(result: dict[str, Any]) -> None:
        table = Table(title=f"audit ({len(result.get('entries', []))})", title_justify="left", box=None,
                      pad_edge=False, header_style="bold")
        table.add_column("at", no_wrap=True)
        table.add_column("operator", no_wrap=True)
        table.add_column("op", no_wrap=True)
        table.add_column("outcome", no_wrap=True)
        table.add_column("params", overflow="fold")
        for e in result.get("entries", []):
            at = e.get("at")
            when = time.strftime("%m-%d %H:%M:%S", time.localtime(at)) if isinstance(at, (int, float)) else at
            operator_did = str(e.get("operator", ""))
            table.add_row(_esc(when or ""), _esc(short_did(operator_did)[:13]), _esc(e.get("op", "")),
                          _esc(e.get("outcome", "")), _esc(e.get("params", e.get("summary", ""))))
        _console().print(table)

    _run(opts, as_json, "audit.list", _call("audit.list", params, request_timeout), render)


def register(app: typer.Typer) -> None:
    """Attach ``autoglm fleet`` to the root app."""
    app.add_typer(fleet_app, name="fleet")


__all__ = ["fleet_app", "register", "build_where", "parse_assignments", "parse_target", "parse_value",
           "devices_table", "short_did", "HINTS"]
