"""Credentials without status lists: the data model's members, issuing, and the core checks.

``check_credential`` verifies the proof, issuer control, validity period and trust policy, and
asks a :class:`StatusCheck` (see :mod:`sdk.identity.status_list`) about ``credentialStatus``.
``sdk.identity.credentials.verify_credential`` is the public entry point built on it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, Protocol

from sdk.identity.datetimes import format_datetime, parse_datetime
from sdk.identity.errors import (
    Expired,
    IdentityError,
    KeyNotAuthorized,
    MalformedError,
    NotYetValid,
    StatusUnavailable,
    UnsupportedProof,
    UntrustedIssuer,
)
from sdk.identity.hazmat.data_integrity import PROOF_TYPE, DataIntegrityProof
from sdk.identity.hazmat.proof_backends import proof_backend
from sdk.identity.jwt_vc import claims_to_credential, credential_to_claims, sign_jwt, verify_jwt
from sdk.identity.keys import Key
from sdk.identity.resolver import Resolver
from sdk.identity.results import VerificationResult
from sdk.identity.trust import TrustPolicy

log = logging.getLogger(__name__)

V1_CONTEXT = "https://www.w3.org/2018/credentials/v1"
V2_CONTEXT = "https://www.w3.org/ns/credentials/v2"
PROOF_FORMATS = ("eddsa-jcs-2022", "jwt")
DEFAULT_SKEW = timedelta(seconds=60)
ASSERTION = "assertionMethod"
_LD_PROOF_TYPES = frozenset({"Ed25519Signature2018", "Ed25519Signature2020"})
#: Exceptions that hostile field types can raise deep in a check; they become ``malformed``.
_SHAPE_ERRORS = (TypeError, KeyError, AttributeError, ValueError, IndexError, OverflowError, RecursionError)


class StatusCheck(Protocol):
    """What ``check_credential`` asks about ``credentialStatus`` (a :class:`StatusChecker`)."""

    def check(self, credential_status: Any, *, issuer: str | None, now: Any = None) -> None: ...


def context_version(doc: Mapping[str, Any]) -> int:
    """1 or 2, from the first ``@context`` entry; MalformedError otherwise."""
    ctx = doc.get("@context")
    first = ctx[0] if isinstance(ctx, list) and ctx else ctx
    if isinstance(first, str):
        if first == V2_CONTEXT:
            return 2
        if first == V1_CONTEXT:
            return 1
    raise MalformedError("@context must start with the VC 1.1 or 2.0 context")


def issuer_id(credential: Mapping[str, Any]) -> str:
    issuer = credential.get("issuer")
    if isinstance(issuer, Mapping):
        issuer = issuer.get("id")
    if not isinstance(issuer, str) or not issuer:
        raise MalformedError("credential needs an issuer (string or object with id)")
    return issuer


def credential_types(doc: Mapping[str, Any], required: str) -> list[str]:
    """The ``type`` member as a list of strings that includes ``required``; MalformedError otherwise."""
    types = doc.get("type")
    types = [types] if isinstance(types, str) else types
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types) or required not in types:
        raise MalformedError(f"type must include {required}")
    return types


def subject_ids(credential: Mapping[str, Any]) -> list[str | None]:
    """The ``id`` of each credentialSubject (None where a subject has none)."""
    subjects = credential.get("credentialSubject")
    subjects = [subjects] if isinstance(subjects, Mapping) else subjects
    if not isinstance(subjects, list) or not subjects or not all(isinstance(s, Mapping) for s in subjects):
        raise MalformedError("credentialSubject must be an object or a non-empty list of objects")
    ids = [s.get("id") for s in subjects]
    if any(i is not None and not isinstance(i, str) for i in ids):
        raise MalformedError("credentialSubject.id must be a string")
    return ids


def validity(cred: Mapping[str, Any], version: int) -> tuple[datetime | None, datetime | None]:
    """(start, end) of the validity period: issuanceDate/expirationDate or validFrom/validUntil."""
    start_name, end_name = ("issuanceDate", "expirationDate") if version == 1 else ("validFrom", "validUntil")
    if version == 1 and start_name not in cred:
        raise MalformedError("VC 1.1 credentials need issuanceDate")
    start = parse_datetime(cred[start_name]) if start_name in cred else None
    end = parse_datetime(cred[end_name]) if end_name in cred else None
    return start, end


def _prepare(credential: Mapping[str, Any], key: Key, created: str | datetime | None,
             credential_status: Mapping[str, Any] | list[Any] | None) -> dict[str, Any]:
    if not isinstance(credential, Mapping):
        raise TypeError("credential must be a dict")
    if not isinstance(key, Key):
        raise TypeError("key must be a sdk.identity.Key")
    cred = {k: v for k, v in credential.items() if k != "proof"}
    try:
        version = context_version(cred)
        credential_types(cred, "VerifiableCredential")
        subject_ids(cred)
    except MalformedError as exc:
        raise ValueError(f"cannot issue a malformed credential: {exc}") from None
    if "issuer" not in cred:
        cred["issuer"] = key.did
    issuer = issuer_id(cred)
    if issuer.startswith("did:key:") and issuer != key.did:
        raise ValueError(f"issuer {issuer} is a did:key for another key than {key.did}")
    if version == 1 and "issuanceDate" not in cred:
        cred["issuanceDate"] = created if isinstance(created, str) else format_datetime(created)
    if credential_status is not None:
        cred["credentialStatus"] = credential_status
    return cred


def issue_credential(
    credential: Mapping[str, Any],
    key: Key,
    *,
    proof_format: str = "eddsa-jcs-2022",
    verification_method: str | None = None,
    created: str | datetime | None = None,
    credential_status: Mapping[str, Any] | list[Any] | None = None,
) -> dict[str, Any] | str:
    """Sign ``credential`` (issuer defaults to ``key.did``): a secured dict, or a VC-JWT string.

    ``credential_status`` (e.g. from :func:`status_entry`) is embedded as ``credentialStatus``.
    """
    cred = _prepare(credential, key, created, credential_status)
    vm = verification_method or key.verification_method
    if proof_format == "eddsa-jcs-2022":
        return DataIntegrityProof.sign(cred, key, verification_method=vm, proof_purpose=ASSERTION,
                                       created=created)
    if proof_format == "jwt":
        iat = parse_datetime(created) if isinstance(created, str) else created
        return sign_jwt(credential_to_claims(cred, iat=iat), key, kid=vm)
    raise ValueError(f"proof_format must be one of {PROOF_FORMATS}")


def _ld_backend(proof_type: str) -> Any:
    from sdk.identity import didkit_backend  # optional: routes LD proofs to didkit when installed

    didkit_backend.register_backend()
    return proof_backend(proof_type)


def _verify_signature(credential: Any, resolver: Resolver, result: VerificationResult,
                      proof_purpose: str) -> dict[str, Any]:
    """Check the proof; fill format/vm/issuer; return the credential as a dict."""
    if isinstance(credential, str):
        result.proof_format = "jwt"
        header, claims, resolved = verify_jwt(credential, resolver=resolver, proof_purpose=proof_purpose)
        cred = claims_to_credential(claims)
        result.verification_method = header["kid"]
        if resolved.controller != issuer_id(cred):
            raise KeyNotAuthorized(f"{header['kid']} is not controlled by issuer {issuer_id(cred)}")
        return cred
    if not isinstance(credential, Mapping):
        raise MalformedError("a credential is a dict (Data Integrity) or a VC-JWT string")
    cred = dict(credential)
    proof = cred.get("proof")
    proof_type = proof.get("type") if isinstance(proof, Mapping) else None
    issuer = issuer_id(cred)
    if proof_type == PROOF_TYPE:
        result.proof_format = "eddsa-jcs-2022"
        _, proof = DataIntegrityProof.verify(cred, resolver=resolver, proof_purpose=proof_purpose,
                                             controller=issuer)
        result.verification_method = proof["verificationMethod"]
        return cred
    if not isinstance(proof_type, str):
        raise UnsupportedProof(f"no verifier for proof type {proof_type!r}"[:120])
    backend = proof_backend(proof_type)
    if backend is None and proof_type in _LD_PROOF_TYPES:
        backend = _ld_backend(proof_type)
    if backend is None:
        raise UnsupportedProof(f"no verifier for proof type {proof_type!r}"[:120])
    result.proof_format = proof_type
    vm = backend(cred, proof_purpose=proof_purpose)
    result.verification_method = vm
    if isinstance(vm, str) and vm.partition("#")[0] != issuer:
        raise KeyNotAuthorized(f"{vm} is not controlled by issuer {issuer}")
    return cred


def check_credential(
    credential: Any,
    *,
    resolver: Resolver,
    now: datetime,
    skew: timedelta,
    trust: TrustPolicy,
    status: StatusCheck | None,
    check_status: bool = True,
    proof_purpose: str = ASSERTION,
) -> VerificationResult:
    """Verify with normalized arguments (shared by credentials, presentations and status lists).

    Never raises for bad input: every failure is a reason in the result's ``errors``.
    """
    result = VerificationResult()
    try:
        return _check(credential, result, resolver=resolver, now=now, skew=skew, trust=trust, status=status,
                      check_status=check_status, proof_purpose=proof_purpose)
    except IdentityError as exc:
        result.add_exception(exc)
        log.info("credential rejected: %s (%s)", exc.reason, exc)
    except _SHAPE_ERRORS as exc:
        result.add_error("malformed", f"malformed credential ({type(exc).__name__})")
        log.info("credential rejected: malformed (%s: %s)", type(exc).__name__, str(exc)[:200])
    result.verified = False
    return result


def _check(credential: Any, result: VerificationResult, *, resolver: Resolver, now: datetime, skew: timedelta,
           trust: TrustPolicy, status: StatusCheck | None, check_status: bool,
           proof_purpose: str) -> VerificationResult:
    if not isinstance(trust, TrustPolicy):
        raise MalformedError("trust must be a TrustPolicy (TrustPolicy.ANY accepts any issuer)")
    if isinstance(credential, Mapping):
        context_version(credential)  # cheap shape checks before any crypto
        issuer_id(credential)
    cred = _verify_signature(credential, resolver, result, proof_purpose)
    version = context_version(cred)
    result.credential = cred
    result.types = credential_types(cred, "VerifiableCredential")
    result.issuer = issuer_id(cred)
    subjects = subject_ids(cred)
    result.subject = subjects[0] if len(subjects) == 1 else None
    start, end = validity(cred, version)
    result.issued_at, result.expires_at = start, end
    if start is not None and now + skew < start:
        result.add_exception(NotYetValid(f"valid from {start.isoformat()}"))
    if end is not None and now - skew > end:
        result.add_exception(Expired(f"expired at {end.isoformat()}"))
    if "credentialStatus" in cred and check_status:
        if status is None:
            result.add_exception(StatusUnavailable(
                "credential has credentialStatus but no status source was given"))
        else:
            try:
                status.check(cred["credentialStatus"], issuer=result.issuer, now=now)
            except IdentityError as exc:
                result.add_exception(exc)
    if not trust.allows(result.issuer, result.types):
        result.add_exception(UntrustedIssuer(f"{result.issuer} may not issue {result.types}"))
    result.verified = not result.errors
    if result.errors:
        log.info("credential from %s rejected: %s", result.issuer, ",".join(result.errors))
    return result


__all__ = [
    "issue_credential",
    "check_credential",
    "StatusCheck",
    "context_version",
    "issuer_id",
    "credential_types",
    "subject_ids",
    "validity",
    "V1_CONTEXT",
    "V2_CONTEXT",
    "PROOF_FORMATS",
    "DEFAULT_SKEW",
]
