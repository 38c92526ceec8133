"""`autoglm` commands for the identity layer: ``id``, ``vc``, ``vp`` and ``status-list``.

Readable output by default, ``--json`` for scripts; failures go through :mod:`sdk.cli.errors`
(exit 1, ``error: <reason>: <message>`` and a ``hint:`` on stderr; with ``--json``: ``{"ok": false,
"reason": ..., "error": {...}}`` on stdout).
SDK modules are imported inside the commands so ``autoglm --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from sdk.cli.errors import CliError, Problem, guard, hint_for, report

if TYPE_CHECKING:
    from sdk.identity.keys import Key
    from sdk.identity.results import VerificationResult

log = logging.getLogger(__name__)

PASSPHRASE_ENV = "AUTOGLM_PASSPHRASE"
KEYSTORE_ENV = "AUTOGLM_KEYSTORE"
FORMATS = ("eddsa-jcs-2022", "jwt")

id_app = typer.Typer(name="id", help="Your DID: create and show an encrypted keystore.", no_args_is_help=True)
vc_app = typer.Typer(name="vc", help="Issue and verify Verifiable Credentials.", no_args_is_help=True)
vp_app = typer.Typer(
    name="vp", help="Create and verify Verifiable Presentations (DID Auth).", no_args_is_help=True
)
sl_app = typer.Typer(
    name="status-list", help="Bitstring Status Lists: create, set/clear bits, check.", no_args_is_help=True
)

# -- shared options -------------------------------------------------------------------------------

KeystoreOpt = typer.Option(
    None, "--keystore", "-k", envvar=KEYSTORE_ENV,
    help="Keystore file (default ~/.autoglm/keystore.json)",
)
PassOpt = typer.Option(
    None, "--passphrase", envvar=PASSPHRASE_ENV,
    help="Keystore passphrase (else prompted)",
)
KeyNameOpt = typer.Option(None, "--key-name", "-n", help="Named key in the keystore (default: default key)")
JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON output")
OutOpt = typer.Option(None, "--out", "-o", help="Write the result here instead of stdout")
FormatOpt = typer.Option("eddsa-jcs-2022", "--format", "-f", help="Proof format: eddsa-jcs-2022 | jwt")
TrustOpt = typer.Option(None, "--trust", help="ISSUER=Type1,Type2 (repeatable; '*' for any type)")
TrustFileOpt = typer.Option(None, "--trust-file", help="JSON trust policy: a list of {issuer, types}")
AnyIssuerOpt = typer.Option(
    False, "--any-issuer", help="Accept any issuer whose proof verifies (without it, --trust or "
    "--trust-file, verify exits 1: issuer NOT checked)",
)
StatusOpt = typer.Option(
    None, "--status-list", help="Status list credential FILE or URL=FILE (repeatable)"
)
ResolverOpt = typer.Option(None, "--resolver-file", help="JSON {verification method id: publicKeyMultibase}")
NowOpt = typer.Option(None, "--now", help="Verify as of this ISO 8601 time (default: now)")


#: A command's own failure with a stable reason (exit 1; ``usage=True``: exit 2).
CliFailure = CliError


def _stdout() -> Any:
    from rich.console import Console

    return Console(highlight=False, emoji=False, soft_wrap=True)


def _esc(value: Any) -> str:
    from rich.markup import escape

    return escape(str(value))


def _fail(reason: str, message: str, *, as_json: bool, hint: str | None = None) -> NoReturn:
    """Report a failure (one line, plus a hint when there is one) and exit 1."""
    report(Problem(reason, " ".join(str(message).split()), hint or hint_for(reason)), as_json=as_json)
    raise typer.Exit(1)


def _guard(as_json: bool) -> AbstractContextManager[None]:
    """The shared CLI guard: typed errors and file problems become one line and exit code 1."""
    return guard(as_json=as_json)


def _keystore_path(path: Path | None) -> Path:
    from sdk.identity.keystore import default_keystore_path

    return path.expanduser() if path else default_keystore_path()


def _passphrase(given: str | None, *, confirm: bool = False) -> str:
    if given:
        return given
    try:
        return typer.prompt("Keystore passphrase", hide_input=True, confirmation_prompt=confirm)
    except typer.Abort:
        raise CliFailure(
            "no_passphrase", f"no passphrase: pass --passphrase or set {PASSPHRASE_ENV}"
        ) from None


def _open_key(keystore: Path | None, passphrase: str | None, name: str | None) -> Key:
    from sdk.identity.keystore import Keystore

    store = Keystore.open(_keystore_path(keystore), _passphrase(passphrase))
    return store.get(name) if name else store.key


def _read_text(path: Path) -> str:
    if str(path) == "-":
        return sys.stdin.read()
    return path.read_text(encoding="utf-8")


def _load_doc(path: Path) -> dict[str, Any] | str:
    """A credential/presentation file: JSON object, or a compact JWT (optionally JSON-quoted)."""
    from sdk.identity.files import CredentialFileError, load_credential

    try:
        return load_credential(path)
    except CredentialFileError as exc:
        if exc.reason == "credential_not_found":
            raise CliFailure("file_not_found", f"{path}: no such file") from None
        raise


def _json_file(path: Path) -> Any:
    """A small JSON config file (trust policy, resolver table), parsed strictly."""
    from sdk.identity.hazmat import json as strict_json

    try:
        return strict_json.loads(_read_text(path))
    except ValueError as exc:
        raise CliFailure("invalid_input", f"{path}: not valid JSON ({exc})") from None


def _write_atomic(path: Path, text: str) -> None:
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _serialize(artifact: dict[str, Any] | str) -> str:
    return artifact if isinstance(artifact, str) else json.dumps(artifact, indent=2, ensure_ascii=False)


def _emit_artifact(artifact: dict[str, Any] | str, out: Path | None, *, as_json: bool, what: str,
                   summary: dict[str, Any]) -> None:
    """Write a signed credential/presentation to ``out`` or stdout, with a summary."""
    if out is not None:
        _write_atomic(out, _serialize(artifact) + "\n")
    if as_json:
        typer.echo(json.dumps({"ok": True, **summary, "path": str(out) if out else None, what: artifact}))
    elif out is not None:
        console = _stdout()
        console.print(f"[green]✓[/] {what} written to {_esc(out)}")
        for k, v in summary.items():
            console.print(f"  {k}: {_esc(v)}")
    else:
        typer.echo(_serialize(artifact))


def _trust_policy(trust: list[str] | None, trust_file: Path | None, any_issuer: bool = False) -> Any:
    """The policy from the options; ``TrustPolicy.ANY`` when none is given (the caller says so)."""
    from sdk.identity.trust import TrustPolicy

    if any_issuer and (trust or trust_file is not None):
        raise CliFailure("invalid_input", "--any-issuer cannot be combined with --trust/--trust-file")
    if not trust and trust_file is None:
        return TrustPolicy.ANY
    table: dict[str, set[str]] = {}
    if trust_file is not None:
        config = _json_file(trust_file)
        for issuer, allowed in TrustPolicy.from_config(config).issuers.items():
            table.setdefault(issuer, set()).update(allowed)
    for entry in trust or []:
        issuer, sep, types = entry.rpartition("=")
        if not sep or not issuer or not types:
            raise CliFailure("invalid_input", f"--trust wants ISSUER=Type1,Type2, got {entry!r}")
        table.setdefault(issuer, set()).update(t.strip() for t in types.split(",") if t.strip())
    return TrustPolicy(table)


def _list_url(doc: dict[str, Any] | str) -> str:
    """The URL (credential id) of a status list credential, JSON or JWT."""
    if isinstance(doc, dict):
        url = doc.get("id")
    else:
        from sdk.identity.jwt_vc import claims_to_credential, unverified_claims

        url = claims_to_credential(unverified_claims(doc)).get("id")
    if not isinstance(url, str):
        raise CliFailure("malformed", "status list credential has no id; use --status-list URL=FILE")
    return url


def _status_source(entries: list[str] | None) -> dict[str, Any] | None:
    if not entries:
        return None
    source: dict[str, Any] = {}
    for entry in entries:
        url, sep, file = entry.rpartition("=")
        if sep and ("://" in url or url.startswith(("urn:", "did:"))):
            source[url] = _load_doc(Path(file))
        else:
            doc = _load_doc(Path(entry))
            source[_list_url(doc)] = doc
    return source


def _resolver(resolver_file: Path | None) -> Any:
    if resolver_file is None:
        return None
    from sdk.identity.resolver import StaticResolver

    table = _json_file(resolver_file)
    if not isinstance(table, dict):
        raise CliFailure("invalid_input", "--resolver-file must hold a JSON object")
    return StaticResolver(table)


def _now(now: str | None) -> Any:
    if now is None:
        return None
    from sdk.identity.datetimes import parse_datetime

    return parse_datetime(now)


def _check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise CliFailure("invalid_input", f"--format must be one of {', '.join(FORMATS)}")
    return fmt


def _not_checked(what: str) -> Problem:
    """The failure of a verification that passed every check but the issuer's (no trust policy)."""
    return Problem("issuer_not_checked", f"{what} signature valid, issuer NOT checked (no --trust)",
                   hint_for("issuer_not_checked"))


def _result_json(result: VerificationResult, issuer_checked: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ok": result.verified and issuer_checked,
        "verified": result.verified and issuer_checked,
        "signature_valid": result.verified,
        "issuer_checked": issuer_checked,
        "errors": list(result.errors),
        "messages": list(result.messages),
        "issuer": result.issuer,
        "holder": result.holder,
        "subject": result.subject,
        "types": list(result.types),
        "proof_format": result.proof_format,
        "verification_method": result.verification_method,
        "issued_at": result.issued_at.isoformat() if result.issued_at else None,
        "expires_at": result.expires_at.isoformat() if result.expires_at else None,
    }
    if result.credentials:
        out["credentials"] = [_result_json(r, issuer_checked) for r in result.credentials]
    return out


def _report_result(result: VerificationResult, *, as_json: bool, what: str,
                   issuer_checked: bool = True) -> None:
    """Print a verification result; exit 1 with a one-line reason when it failed.

    Without a trust policy (``issuer_checked=False``) a result whose other checks pass is a
    failure too: "signature valid, issuer NOT checked" and exit 1 (``--any-issuer`` accepts any).
    """
    unchecked = result.verified and not issuer_checked
    if as_json:
        out = _result_json(result, issuer_checked)
        if unchecked:
            out.update(_not_checked(what).as_dict())
        typer.echo(json.dumps(out))
        if not out["ok"]:
            raise typer.Exit(1)
        return
    if not result.verified:
        first = result.messages[0] if result.messages else ""
        _fail(",".join(result.errors) or "not_verified", f"{what} not verified: {first}", as_json=False)
    console = _stdout()
    if unchecked:
        fmt = _esc(result.proof_format)
        console.print(f"[yellow]✗ {what} signature valid, issuer NOT checked[/] ({fmt})")
    else:
        console.print(f"[green]✓ {what} verified[/] ({_esc(result.proof_format)})")
    rows = [("issuer", result.issuer), ("holder", result.holder), ("subject", result.subject),
            ("types", ", ".join(result.types) if result.types else None),
            ("verification method", result.verification_method),
            ("valid from", result.issued_at.isoformat() if result.issued_at else None),
            ("valid until", result.expires_at.isoformat() if result.expires_at else None)]
    for label, value in rows:
        if value:
            console.print(f"  {label}: {_esc(value)}")
    for i, sub in enumerate(result.credentials):
        kinds = _esc(", ".join(sub.types))
        state = "[yellow]signature valid[/]" if unchecked else "[green]verified[/]"
        console.print(f"  credential {i}: {kinds} from {_esc(sub.issuer)} → {state}")
    if unchecked:
        report(_not_checked(what), as_json=False)
        raise typer.Exit(1)


def _parse_claim(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise CliFailure("invalid_input", f"--claim wants NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


# -- id -------------------------------------------------------------------------------------------

@id_app.command("new")
def id_new(
    keystore: Path = KeystoreOpt,
    passphrase: str = PassOpt,
    name: str = typer.Option("default", "--name", help="Name of the new key"),
    force: bool = typer.Option(False, "--force", help="Replace an existing keystore"),
    kdf: str = typer.Option("interactive", "--kdf", help="Argon2id cost: interactive | moderate"),
    as_json: bool = JsonOpt,
) -> None:
    """Generate an Ed25519 did:key and store it in an encrypted keystore (adds to an existing one)."""
    with _guard(as_json):
        from sdk.identity.keystore import KdfParams, Keystore, KeystoreError

        if kdf not in ("interactive", "moderate"):
            raise CliFailure("invalid_input", "--kdf must be interactive or moderate")
        params = KdfParams.moderate() if kdf == "moderate" else KdfParams.interactive()
        path = _keystore_path(keystore)
        if path.exists() and not force:
            store = Keystore.open(path, _passphrase(passphrase))
            if name in store.keys:
                raise KeystoreError(
                    f"{path} already holds a key named {name!r} (use --name or --force)",
                    reason="keystore_exists",
                )
            key = store.add(name=name)
            store.save()
        else:
            secret = _passphrase(passphrase, confirm=True)
            store = Keystore.create(path, secret, name=name, kdf=params, overwrite=force)
            key = store.key
        info = {"ok": True, "keystore": str(path), "name": name, "did": key.did,
                "verification_method": key.verification_method}
        if as_json:
            typer.echo(json.dumps(info))
        else:
            console = _stdout()
            console.print(f"[green]✓[/] new key [bold]{_esc(name)}[/] in {_esc(path)}")
            console.print(f"  did: {_esc(key.did)}")


@id_app.command("show")
def id_show(
    keystore: Path = KeystoreOpt,
    passphrase: str = PassOpt,
    name: str = KeyNameOpt,
    document: bool = typer.Option(False, "--document", help="Also print the DID document"),
    as_json: bool = JsonOpt,
) -> None:
    """Show the keystore's DIDs (unlocked and checked when a passphrase is given)."""
    with _guard(as_json):
        from sdk.identity.did_key import did_key_document
        from sdk.identity.keystore import Keystore

        path = _keystore_path(keystore)
        if passphrase:
            store = Keystore.open(path, passphrase)
            dids = {n: k.did for n, k in store.keys.items()}
            default, unlocked = store.default_name, True
        else:
            from sdk.identity.hazmat import json as strict_json

            dids = Keystore.peek(path)  # checked the file: size, JSON, public section
            default = strict_json.loads(path.read_text(encoding="utf-8")).get("default", "default")
            unlocked = False
        selected = name or default
        if selected not in dids:
            raise CliFailure("unknown_key", f"no key named {selected!r} in {path}")
        did = dids[selected]
        info: dict[str, Any] = {"ok": True, "keystore": str(path), "unlocked": unlocked, "default": default,
                                "name": selected, "did": did, "verification_method": f"{did}#{did[8:]}",
                                "keys": dids}
        if document:
            info["document"] = did_key_document(did)
        if as_json:
            typer.echo(json.dumps(info))
            return
        console = _stdout()
        state = "unlocked" if unlocked else "locked: DIDs not authenticated"
        console.print(f"keystore: {_esc(path)} ({state})")
        for n in sorted(dids):
            mark = "*" if n == default else " "
            console.print(f" {mark} {_esc(n)}: {_esc(dids[n])}")
        if document:
            typer.echo(json.dumps(info["document"], indent=2))


# -- vc -------------------------------------------------------------------------------------------

@vc_app.command("issue")
def vc_issue(
    input_file: Path = typer.Argument(
        None, help="Unsigned credential JSON ('-' for stdin); else built from options"
    ),
    subject: str = typer.Option(None, "--subject", "-s", help="credentialSubject.id (a DID)"),
    types: list[str] = typer.Option(None, "--type", "-t", help="Credential type (repeatable)"),
    claims: list[str] = typer.Option(None, "--claim", "-c", help="Subject claim NAME=VALUE (JSON value ok)"),
    valid_from: str = typer.Option(None, "--valid-from", help="ISO 8601 start"),
    valid_until: str = typer.Option(None, "--valid-until", help="ISO 8601 end"),
    cred_id: str = typer.Option(None, "--id", help="Credential id (URI)"),
    v1: bool = typer.Option(False, "--v1", help="Build a VC Data Model 1.1 credential (default 2.0)"),
    status_url: str = typer.Option(None, "--status-url", help="Status list credential URL"),
    status_index: int = typer.Option(None, "--status-index", help="Index in that status list"),
    status_purpose: str = typer.Option("revocation", "--status-purpose", help="revocation | suspension"),
    valid_for: str = typer.Option(
        "30d", "--valid-for", help="DeviceCredential validity when --valid-until is not given: seconds or 30d/12h/90m"
    ),
    no_status: bool = typer.Option(
        False, "--no-status", help="DeviceCredential without a status entry (cannot be revoked)"
    ),
    no_expiry: bool = typer.Option(False, "--no-expiry", help="DeviceCredential without a validity end"),
    fmt: str = FormatOpt,
    out: Path = OutOpt,
    keystore: Path = KeystoreOpt,
    passphrase: str = PassOpt,
    key_name: str = KeyNameOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Sign a credential with your key (the issuer).

    A DeviceCredential gets, unless told otherwise, a validity period (--valid-for, default 30
    days) and a revocation entry in the issuer's status list over MQTT, at an index recorded in
    the ledger next to the keystore (<keystore>.status-ledger.json) from the range the
    coordinator leaves to offline issuance, so the two never hand out the same index.
    """
    with _guard(as_json):
        import secrets
        from datetime import timedelta

        from sdk.identity.credentials import V1_CONTEXT, V2_CONTEXT, issue_credential
        from sdk.identity.datetimes import format_datetime, parse_datetime
        from sdk.identity.status_ledger import StatusLedger, ledger_path
        from sdk.identity.status_list import status_entry
        from sdk.messaging.status import status_list_url

        units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
        try:
            number, unit = (valid_for[:-1], units[valid_for[-1]]) if valid_for[-1:] in units else (valid_for, 1)
            valid_seconds = float(number) * unit
        except ValueError:
            valid_seconds = -1.0
        if not 1 <= valid_seconds <= 10 * 365 * 86400:
            raise CliFailure("invalid_input", f"--valid-for must be 1s..10 years (seconds or 30d/12h/90m), "
                             f"got {valid_for!r}")

        _check_format(fmt)
        if input_file is not None:
            credential = _load_doc(input_file)
            if not isinstance(credential, dict):
                raise CliFailure("malformed", f"{input_file}: expected an unsigned credential JSON object")
        else:
            if not subject:
                raise CliFailure("invalid_input", "give a credential file or at least --subject")
            body: dict[str, Any] = {"id": subject}
            body.update(_parse_claim(c) for c in claims or [])
            credential = {
                "@context": [V1_CONTEXT if v1 else V2_CONTEXT],
                "type": ["VerifiableCredential", *[t for t in types or [] if t != "VerifiableCredential"]],
                "credentialSubject": body,
            }
            start, end = ("issuanceDate", "expirationDate") if v1 else ("validFrom", "validUntil")
            credential[start] = format_datetime(parse_datetime(valid_from) if valid_from else None)
            if valid_until:
                credential[end] = format_datetime(parse_datetime(valid_until))
        if cred_id:
            credential["id"] = cred_id
        kinds = credential.get("type")
        device = isinstance(kinds, list) and "DeviceCredential" in kinds
        if device and not no_expiry and not any(k in credential for k in ("validUntil", "expirationDate")):
            start_key = "issuanceDate" if "issuanceDate" in credential else "validFrom"
            start = parse_datetime(credential[start_key]) if start_key in credential else None
            if start is None:
                credential[start_key] = format_datetime(None)
                start = parse_datetime(credential[start_key])
            end_key = "expirationDate" if start_key == "issuanceDate" else "validUntil"
            credential[end_key] = format_datetime(start + timedelta(seconds=valid_seconds))
        entry = None
        if no_status and (status_url is not None or status_index is not None):
            raise CliFailure("invalid_input", "--no-status excludes --status-url and --status-index")
        key = _open_key(keystore, passphrase, key_name)
        own_url = status_list_url(key.did)
        summary: dict[str, Any] = {"format": fmt, "issuer": key.did}
        if (device and not no_status and (status_url is None or status_url == own_url)) or (
                status_url == own_url and status_index is not None):
            # this issuer's list over MQTT: the index comes from (or is checked against) the ledger
            subject_id = credential.get("credentialSubject", {})
            subject_id = subject_id.get("id") if isinstance(subject_id, dict) else None
            if device and not isinstance(credential.get("id"), str):
                credential["id"] = f"urn:uuid:{secrets.token_hex(16)}"
            ledger = StatusLedger(ledger_path(_keystore_path(keystore)))
            index = ledger.allocate(key.did, subject=str(subject_id), credential_id=credential.get("id"),
                                    index=status_index)
            entry = status_entry(own_url, index, purpose=status_purpose)
            summary.update(status_index=index, ledger=str(ledger.path))
        elif status_url is not None or status_index is not None:
            if status_url is None or status_index is None:
                raise CliFailure("invalid_input", "--status-url and --status-index go together")
            entry = status_entry(status_url, status_index, purpose=status_purpose)
        signed = issue_credential(credential, key, proof_format=fmt, credential_status=entry)
        _emit_artifact(signed, out, as_json=as_json, what="credential", summary=summary)


@vc_app.command("verify")
def vc_verify(
    file: Path = typer.Argument(..., help="Credential: JSON (DI / LD proof) or VC-JWT; '-' for stdin"),
    trust: list[str] = TrustOpt,
    trust_file: Path = TrustFileOpt,
    any_issuer: bool = AnyIssuerOpt,
    status_lists: list[str] = StatusOpt,
    no_status: bool = typer.Option(False, "--no-status", help="Skip credentialStatus checks"),
    resolver_file: Path = ResolverOpt,
    now: str = NowOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Verify a credential: proof, issuer key, validity period, status, trust policy."""
    with _guard(as_json):
        from sdk.identity.credentials import verify_credential

        _maybe_register_didkit()
        policy = _trust_policy(trust, trust_file, any_issuer)
        result = verify_credential(
            _load_doc(file), resolver=_resolver(resolver_file), now=_now(now),
            trust=policy, status=_status_source(status_lists), check_status=not no_status,
        )
        _report_result(result, as_json=as_json, what="credential",
                       issuer_checked=any_issuer or bool(trust) or trust_file is not None)


def _maybe_register_didkit() -> None:
    """Route Ed25519Signature2018/2020 proofs to didkit when it is installed."""
    from sdk.identity import didkit_backend

    didkit_backend.register_backend()


# -- vp -------------------------------------------------------------------------------------------

@vp_app.command("create")
def vp_create(
    credentials: list[Path] = typer.Argument(..., help="Credential files (JSON or VC-JWT) to present"),
    challenge: str = typer.Option(..., "--challenge", help="The verifier's nonce"),
    domain: str = typer.Option(None, "--domain", help="The verifier's domain (audience)"),
    fmt: str = FormatOpt,
    out: Path = OutOpt,
    keystore: Path = KeystoreOpt,
    passphrase: str = PassOpt,
    key_name: str = KeyNameOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Wrap credentials in a presentation signed by your key (the holder)."""
    with _guard(as_json):
        from sdk.identity.presentations import create_presentation

        _check_format(fmt)
        docs = [_load_doc(p) for p in credentials]
        key = _open_key(keystore, passphrase, key_name)
        signed = create_presentation(docs, key, challenge=challenge, domain=domain, proof_format=fmt)
        _emit_artifact(signed, out, as_json=as_json, what="presentation",
                       summary={"format": fmt, "holder": key.did, "credentials": len(docs)})


@vp_app.command("verify")
def vp_verify(
    file: Path = typer.Argument(..., help="Presentation: JSON or VP-JWT; '-' for stdin"),
    challenge: str = typer.Option(..., "--challenge", help="The nonce you issued"),
    domain: str = typer.Option(None, "--domain", help="Your domain (required if the VP names one)"),
    trust: list[str] = TrustOpt,
    trust_file: Path = TrustFileOpt,
    any_issuer: bool = AnyIssuerOpt,
    status_lists: list[str] = StatusOpt,
    no_status: bool = typer.Option(False, "--no-status", help="Skip credentialStatus checks"),
    resolver_file: Path = ResolverOpt,
    now: str = NowOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Verify a presentation: holder proof, challenge, domain, and every credential inside."""
    with _guard(as_json):
        from sdk.identity.presentations import verify_presentation

        _maybe_register_didkit()
        result = verify_presentation(
            _load_doc(file), challenge=challenge, domain=domain, resolver=_resolver(resolver_file),
            now=_now(now), trust=_trust_policy(trust, trust_file, any_issuer),
            status=_status_source(status_lists), check_status=not no_status,
        )
        _report_result(result, as_json=as_json, what="presentation",
                       issuer_checked=any_issuer or bool(trust) or trust_file is not None)


# -- status-list ----------------------------------------------------------------------------------

def _load_status_list(file: Path, key: Key) -> tuple[dict[str, Any], Any, str]:
    """Verify a status list credential issued by ``key``; return (credential, StatusList, format)."""
    from sdk.identity.credentials import verify_credential
    from sdk.identity.status_list import StatusList
    from sdk.identity.trust import TrustPolicy

    doc = _load_doc(file)
    result = verify_credential(doc, trust=TrustPolicy.ANY, check_status=False)  # issuer checked below
    if not result.verified:
        raise CliFailure(",".join(result.errors), f"{file}: status list credential does not verify")
    cred = result.credential or {}
    if result.issuer != key.did:
        raise CliFailure(
            "key_not_authorized", f"{file} was issued by {result.issuer}, not by your key {key.did}"
        )
    subject = cred.get("credentialSubject", {})
    fmt = "jwt" if isinstance(doc, str) else "eddsa-jcs-2022"
    return cred, StatusList.decode(subject.get("encodedList")), fmt


def _reissue(file: Path, cred: dict[str, Any], bits: Any, key: Key, fmt: str) -> None:
    from sdk.identity.datetimes import parse_datetime
    from sdk.identity.status_list import DEFAULT_TTL, create_status_list_credential

    subject = cred["credentialSubject"]
    ttl = DEFAULT_TTL
    if isinstance(cred.get("validFrom"), str) and isinstance(cred.get("validUntil"), str):
        ttl = parse_datetime(cred["validUntil"]) - parse_datetime(cred["validFrom"])
    # a new validFrom (now) and sequence make the re-signed list newer than the old one
    signed = create_status_list_credential(
        key, cred["id"], status_list=bits, purpose=subject.get("statusPurpose", "revocation"),
        ttl=ttl if ttl.total_seconds() > 0 else DEFAULT_TTL, proof_format=fmt,
    )
    _write_atomic(file, _serialize(signed) + "\n")


def _set_bits(file: Path, indexes: list[int], value: bool, keystore: Path | None, passphrase: str | None,
              key_name: str | None, as_json: bool) -> None:
    with _guard(as_json):
        key = _open_key(keystore, passphrase, key_name)
        cred, bits, fmt = _load_status_list(file, key)
        for index in indexes:
            try:
                bits.set(index, value)
            except IndexError as exc:
                raise CliFailure("invalid_input", str(exc)) from None
        _reissue(file, cred, bits, key, fmt)
        if as_json:
            typer.echo(json.dumps({"ok": True, "url": cred["id"], "indexes": indexes, "set": value}))
        else:
            verb = "set" if value else "cleared"
            _stdout().print(f"[green]✓[/] {verb} {_esc(indexes)} in {_esc(cred['id'])} ({_esc(file)})")


@sl_app.command("create")
def sl_create(
    url: str = typer.Argument(..., help="The status list credential's URL (its id)"),
    out: Path = typer.Option(..., "--out", "-o", help="File to write the signed status list credential to"),
    size: int = typer.Option(131072, "--size", help="Number of entries (multiple of 8; spec minimum 131072)"),
    purpose: str = typer.Option("revocation", "--purpose", help="revocation | suspension"),
    ttl_hours: float = typer.Option(24.0, "--ttl-hours", help="Hours the list stays valid"),
    fmt: str = FormatOpt,
    keystore: Path = KeystoreOpt,
    passphrase: str = PassOpt,
    key_name: str = KeyNameOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Create an all-clear status list credential signed by your key."""
    with _guard(as_json):
        from sdk.identity.status_list import StatusList, create_status_list_credential

        _check_format(fmt)
        if out.exists():
            raise CliFailure("file_exists", f"{out} exists; status lists are changed with set/clear")
        if not ttl_hours > 0:
            raise CliFailure("invalid_input", "--ttl-hours must be positive")
        bits = StatusList(size)
        key = _open_key(keystore, passphrase, key_name)
        signed = create_status_list_credential(key, url, status_list=bits, purpose=purpose, proof_format=fmt,
                                               ttl=ttl_hours * 3600)
        _write_atomic(out, _serialize(signed) + "\n")
        if as_json:
            info = {"ok": True, "url": url, "path": str(out), "size": size, "purpose": purpose}
            typer.echo(json.dumps(info))
        else:
            what = f"{_esc(url)} ({size} entries, {_esc(purpose)})"
            _stdout().print(f"[green]✓[/] status list {what} written to {_esc(out)}")


@sl_app.command("set")
def sl_set(
    file: Path = typer.Argument(..., help="Status list credential file (rewritten in place)"),
    indexes: list[int] = typer.Argument(..., help="Indexes to set (revoke / suspend)"),
    keystore: Path = KeystoreOpt,
    passphrase: str = PassOpt,
    key_name: str = KeyNameOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Set bits (revoke or suspend) and re-sign the list."""
    _set_bits(file, indexes, True, keystore, passphrase, key_name, as_json)


@sl_app.command("clear")
def sl_clear(
    file: Path = typer.Argument(..., help="Status list credential file (rewritten in place)"),
    indexes: list[int] = typer.Argument(..., help="Indexes to clear (reinstate)"),
    keystore: Path = KeystoreOpt,
    passphrase: str = PassOpt,
    key_name: str = KeyNameOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Clear bits (reinstate) and re-sign the list."""
    _set_bits(file, indexes, False, keystore, passphrase, key_name, as_json)


@sl_app.command("check")
def sl_check(
    file: Path = typer.Argument(..., help="Status list credential file"),
    indexes: list[int] = typer.Argument(..., help="Indexes to check"),
    as_json: bool = JsonOpt,
) -> None:
    """Verify the list and report bits; exit 1 if any given index is set (revoked/suspended)."""
    with _guard(as_json):
        from sdk.identity.credentials import verify_credential
        from sdk.identity.status_list import StatusList
        from sdk.identity.trust import TrustPolicy

        result = verify_credential(_load_doc(file), trust=TrustPolicy.ANY, check_status=False)  # issuer shown
        if not result.verified:
            raise CliFailure(",".join(result.errors), f"{file}: status list credential does not verify")
        subject = (result.credential or {}).get("credentialSubject", {})
        purpose = subject.get("statusPurpose", "revocation")
        bits = StatusList.decode(subject.get("encodedList"))
        states: dict[int, bool] = {}
        for index in indexes:
            try:
                states[index] = bits.get(index)
            except IndexError as exc:
                raise CliFailure("invalid_input", str(exc)) from None
        flagged = [i for i, v in states.items() if v]
        reason = "revoked" if purpose == "revocation" else "suspended"
        if as_json:
            typer.echo(json.dumps({"ok": not flagged, "purpose": purpose, "issuer": result.issuer,
                                   "bits": {str(i): v for i, v in states.items()}}))
            if flagged:
                raise typer.Exit(1)
            return
        if flagged:
            _fail(reason, f"index {', '.join(map(str, flagged))} set in {file}", as_json=False)
        listed = ", ".join(map(str, indexes))
        _stdout().print(f"[green]✓[/] clear: {listed} ({_esc(purpose)} list by {_esc(result.issuer)})")


# -- registration ---------------------------------------------------------------------------------

_GROUPS: tuple[typer.Typer, ...] = (id_app, vc_app, vp_app, sl_app)


def register(app: typer.Typer) -> None:
    """Attach this module's commands and groups to the root app."""
    for group in _GROUPS:
        app.add_typer(group)


__all__ = ["register", "id_app", "vc_app", "vp_app", "sl_app"]
