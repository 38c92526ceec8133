"""Verifiable Presentations (DID Auth): holder-signed, bound to a challenge and optional domain.

``verify_presentation`` checks the holder's proof (purpose ``authentication``), challenge and
domain, every embedded credential in full, and that each credential's subject is the holder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sdk.identity.credentials import bad_arguments
from sdk.identity.datetimes import as_now, as_skew, from_timestamp, parse_datetime
from sdk.identity.errors import (
    Expired,
    HolderMismatch,
    IdentityError,
    KeyNotAuthorized,
    MalformedError,
    NotYetValid,
    UnsupportedProof,
    WrongChallenge,
    WrongDomain,
)
from sdk.identity.hazmat.data_integrity import PROOF_TYPE, DataIntegrityProof
from sdk.identity.jwt_vc import claims_to_presentation, presentation_to_claims, sign_jwt, verify_jwt
from sdk.identity.keys import Key
from sdk.identity.resolver import Resolver, as_resolver
from sdk.identity.results import VerificationResult
from sdk.identity.status_list import StatusChecker, as_status_checker
from sdk.identity.trust import TrustPolicy
from sdk.identity.vc import DEFAULT_SKEW, V1_CONTEXT, V2_CONTEXT, check_credential, context_version

log = logging.getLogger(__name__)

AUTHENTICATION = "authentication"
_SHAPE_ERRORS = (TypeError, KeyError, AttributeError, ValueError, IndexError, OverflowError, RecursionError)
ENVELOPED_TYPE = "EnvelopedVerifiableCredential"
_JWT_DATA_URLS = ("data:application/vc+jwt,", "data:application/vc-ld+jwt,", "data:application/jwt,")


def envelope_jwt(token: str) -> dict[str, Any]:
    """Wrap a VC-JWT as a VC 2.0 ``EnvelopedVerifiableCredential``."""
    return {"@context": V2_CONTEXT, "id": "data:application/vc+jwt," + token, "type": ENVELOPED_TYPE}


def _unwrap(entry: Any) -> Any:
    """A credential entry as given to ``check_credential``: a dict or a JWT string."""
    if isinstance(entry, Mapping) and entry.get("type") == ENVELOPED_TYPE:
        data = entry.get("id")
        for prefix in _JWT_DATA_URLS:
            if isinstance(data, str) and data.startswith(prefix):
                return data[len(prefix):]
        raise MalformedError("EnvelopedVerifiableCredential must hold a data: URL with a JWT")
    return entry


def create_presentation(
    credentials: Sequence[Mapping[str, Any] | str] | Mapping[str, Any] | str,
    holder_key: Key,
    *,
    challenge: str,
    domain: str | None = None,
    proof_format: str = "eddsa-jcs-2022",
    holder: str | None = None,
    verification_method: str | None = None,
    created: str | datetime | None = None,
    version: int | None = None,
) -> dict[str, Any] | str:
    """Wrap ``credentials`` in a presentation signed by ``holder_key`` (dict, or VP-JWT string).

    The VP uses VC 1.1 if any credential dict does (or ``version=1``), else 2.0; JWT VCs are
    embedded as strings (1.1) or ``EnvelopedVerifiableCredential`` (2.0).
    """
    if not isinstance(challenge, str) or not challenge:
        raise ValueError("challenge must be a non-empty string")
    if domain is not None and (not isinstance(domain, str) or not domain):
        raise ValueError("domain must be a non-empty string or None")
    if not isinstance(holder_key, Key):
        raise TypeError("holder_key must be a sdk.identity.Key")
    if isinstance(credentials, (str, Mapping)):
        credentials = [credentials]
    creds = list(credentials)
    if version is None:
        v1 = any(isinstance(c, Mapping) and c.get("@context", [None])[0] == V1_CONTEXT for c in creds)
        version = 1 if v1 else 2
    if version not in (1, 2):
        raise ValueError("version must be 1 or 2")
    embedded = [envelope_jwt(c) if isinstance(c, str) and version == 2 else c for c in creds]
    vp: dict[str, Any] = {
        "@context": [V1_CONTEXT if version == 1 else V2_CONTEXT],
        "type": ["VerifiablePresentation"],
        "holder": holder or holder_key.did,
    }
    if embedded:
        vp["verifiableCredential"] = embedded
    vm = verification_method or holder_key.verification_method
    if proof_format == "eddsa-jcs-2022":
        return DataIntegrityProof.sign(vp, holder_key, verification_method=vm, proof_purpose=AUTHENTICATION,
                                       created=created, challenge=challenge, domain=domain)
    if proof_format == "jwt":
        iat = parse_datetime(created) if isinstance(created, str) else created
        claims = presentation_to_claims(vp, challenge=challenge, domain=domain, iat=iat)
        return sign_jwt(claims, holder_key, kid=vm)
    raise ValueError("proof_format must be 'eddsa-jcs-2022' or 'jwt'")


def _domain_matches(actual: Any, expected: str | None) -> bool:
    if expected is None:
        return actual is None
    if isinstance(actual, list):
        return expected in actual
    return actual == expected


def _verify_vp_proof(presentation: Any, resolver: Resolver, result: VerificationResult,
                     challenge: str, domain: str | None, now: datetime, skew: timedelta) -> dict[str, Any]:
    if isinstance(presentation, str):
        result.proof_format = "jwt"
        header, claims, resolved = verify_jwt(presentation, resolver=resolver, proof_purpose=AUTHENTICATION)
        vp = claims_to_presentation(claims)
        result.verification_method = header["kid"]
        holder = vp.get("holder")
        if not isinstance(holder, str):
            raise MalformedError("presentation needs a holder")
        if resolved.controller != holder:
            raise KeyNotAuthorized(f"{header['kid']} is not controlled by holder {holder}")
        try:
            if "nbf" in claims and now + skew < from_timestamp(claims["nbf"]):
                raise NotYetValid("presentation not yet valid (nbf)")
            if "exp" in claims and now - skew > from_timestamp(claims["exp"]):
                raise Expired("presentation expired (exp)")
        except (TypeError, ValueError, OverflowError, OSError) as exc:
            raise MalformedError(f"bad nbf/exp: {exc}") from exc
        if claims.get("nonce") != challenge:
            raise WrongChallenge("presentation nonce does not match the challenge")
        if not _domain_matches(claims.get("aud"), domain):
            raise WrongDomain(f"presentation aud {claims.get('aud')!r} does not match {domain!r}")
        return vp
    if not isinstance(presentation, Mapping):
        raise MalformedError("a presentation is a dict (Data Integrity) or a VP-JWT string")
    vp = dict(presentation)
    context_version(vp)
    holder = vp.get("holder")
    if isinstance(holder, Mapping):
        holder = holder.get("id")
    if not isinstance(holder, str) or not holder:
        raise MalformedError("presentation needs a holder")
    proof = vp.get("proof")
    if not isinstance(proof, Mapping) or proof.get("type") != PROOF_TYPE:
        if isinstance(proof, Mapping):
            raise UnsupportedProof(f"unsupported presentation proof {proof.get('type')!r}")
        raise MalformedError("presentation has no proof")
    result.proof_format = "eddsa-jcs-2022"
    _, proof = DataIntegrityProof.verify(vp, resolver=resolver, proof_purpose=AUTHENTICATION,
                                         controller=holder)
    result.verification_method = proof["verificationMethod"]
    if proof.get("challenge") != challenge:
        raise WrongChallenge("presentation proof challenge does not match")
    if not _domain_matches(proof.get("domain"), domain):
        raise WrongDomain(f"presentation proof domain {proof.get('domain')!r} does not match {domain!r}")
    return vp


def verify_presentation(
    presentation: Mapping[str, Any] | str,
    *,
    challenge: str,
    domain: str | None = None,
    resolver: Resolver | Mapping[str, str] | None = None,
    now: datetime | float | None = None,
    skew: timedelta | float = DEFAULT_SKEW,
    trust: TrustPolicy,
    status: StatusChecker | Callable[[str], Any] | Mapping[str, Any] | None = None,
    check_status: bool = True,
) -> VerificationResult:
    """Verify the holder's proof, challenge, domain, and every embedded credential in full.

    ``trust`` applies to the embedded credentials' issuers (``TrustPolicy.ANY``: any issuer).
    The result's ``credentials`` holds one result per embedded credential; their error codes
    are merged into the presentation's ``errors``. Never raises for a bad presentation.
    """
    if not isinstance(challenge, str) or not challenge:
        raise ValueError("challenge must be a non-empty string (it is required)")
    result = VerificationResult()
    try:
        if not isinstance(trust, TrustPolicy):
            raise TypeError("trust must be a TrustPolicy (TrustPolicy.ANY accepts any issuer)")
        res = as_resolver(resolver)
        checker = as_status_checker(status, res)
        when, tol = as_now(now), as_skew(skew)
    except TypeError as exc:
        return bad_arguments(result, exc)
    try:
        vp = _verify_vp_proof(presentation, res, result, challenge, domain, when, tol)
        result.presentation = vp
        holder = vp["holder"]["id"] if isinstance(vp["holder"], Mapping) else vp["holder"]
        if not isinstance(holder, str) or not holder:
            raise MalformedError("presentation needs a holder")
        result.holder = holder
        types = vp.get("type")
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types) \
                or "VerifiablePresentation" not in types:
            raise MalformedError("type must include VerifiablePresentation")
        result.types = list(types)
        entries = vp.get("verifiableCredential", [])
        entries = entries if isinstance(entries, list) else [entries]
        embedded = [_unwrap(e) for e in entries]
    except IdentityError as exc:
        result.add_exception(exc)
        log.info("presentation rejected: %s (%s)", exc.reason, exc)
        return result
    except _SHAPE_ERRORS as exc:
        result.add_error("malformed", f"malformed presentation ({type(exc).__name__})")
        log.info("presentation rejected: malformed (%s: %s)", type(exc).__name__, str(exc)[:200])
        return result
    for cred in embedded:
        sub = check_credential(cred, resolver=res, now=when, skew=tol, trust=trust, status=checker,
                               check_status=check_status)
        result.credentials.append(sub)
        for reason, message in zip(sub.errors, sub.messages, strict=False):
            result.add_error(reason, message)
        if sub.credential is not None:
            subjects = sub.credential.get("credentialSubject")
            subjects = subjects if isinstance(subjects, list) else [subjects]
            if any(not isinstance(s, Mapping) or s.get("id") != holder for s in subjects):
                result.add_exception(HolderMismatch(f"a credential subject is not the holder {holder}"))
    result.verified = not result.errors
    if result.errors:
        log.info("presentation from %s rejected: %s", holder, ",".join(result.errors))
    return result


__all__ = ["create_presentation", "verify_presentation", "envelope_jwt"]
