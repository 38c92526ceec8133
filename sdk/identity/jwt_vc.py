"""VC-JWT (VC Data Model 1.1 §6.3.1): JOSE compact JWS, ``alg: EdDSA``, ``kid`` = DID URL.

Claim mapping (credential → JWT): issuer → ``iss``, credentialSubject.id → ``sub``,
issuanceDate/validFrom → ``nbf``, expirationDate/validUntil → ``exp``, id → ``jti``, the rest
in ``vc`` (``vp`` for presentations, whose holder → ``iss``, challenge → ``nonce``,
domain → ``aud``). JOSE itself is done by joserfc.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError, UnsupportedAlgorithmError
from joserfc.jwk import OKPKey

from sdk.identity.datetimes import format_datetime, from_timestamp, parse_datetime
from sdk.identity.errors import InvalidSignature, KeyNotAuthorized, MalformedError
from sdk.identity.hazmat import json as strict_json
from sdk.identity.hazmat.jws import split_compact
from sdk.identity.keys import Key, PublicKey
from sdk.identity.resolver import ResolvedKey, Resolver

log = logging.getLogger(__name__)

ALG = "EdDSA"
#: Longest compact JWS accepted (characters), checked before any decoding.
MAX_TOKEN_CHARS = 1024 * 1024
_MAX_HEADER_CHARS = 4096
_SIG_CHARS = 86  # 64 bytes of unpadded base64url


class _EdDSAOnly(jws.JWSRegistry):
    """Allows exactly ``EdDSA`` (Ed25519 here), which VC-JWT 1.1 and didkit use.

    joserfc warns that RFC 9864 supersedes the name with ``Ed25519``; we must keep ``EdDSA``.
    """

    def get_alg(self, name: str) -> Any:
        if name != ALG:
            raise UnsupportedAlgorithmError(f"only {ALG} is accepted, not {name!r}")
        return self.algorithms[name]


_REGISTRY = _EdDSAOnly(algorithms=[ALG])
V1_CONTEXT = "https://www.w3.org/2018/credentials/v1"


@functools.lru_cache(maxsize=1024)
def _public_jwk(raw: bytes) -> OKPKey:
    jwk: dict[str, str | list[str]] = dict(PublicKey(raw).to_jwk())
    return OKPKey.import_key(jwk)


def _private_jwk(key: Key) -> OKPKey:
    jwk: dict[str, str | list[str]] = dict(key.to_jwk(private=True))
    return OKPKey.import_key(jwk)


def _epoch(value: Any) -> int:
    return int(parse_datetime(value).timestamp())


def _is_v1(doc: Mapping[str, Any]) -> bool:
    ctx = doc.get("@context")
    first = ctx[0] if isinstance(ctx, list) and ctx else ctx
    return first == V1_CONTEXT


def sign_jwt(claims: Mapping[str, Any], key: Key, *, kid: str) -> str:
    """Compact JWS over ``claims`` with EdDSA and ``kid``."""
    header = {"alg": ALG, "typ": "JWT", "kid": kid}
    payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return jws.serialize_compact(header, payload, _private_jwk(key), registry=_REGISTRY)


def verify_jwt(
    token: str, *, resolver: Resolver, proof_purpose: str
) -> tuple[dict[str, Any], dict[str, Any], ResolvedKey]:
    """Verify a compact EdDSA JWS; return (header, claims, resolved key) or raise."""
    header, payload = _split(token)
    if header.get("alg") != ALG:
        raise MalformedError(f"JWS alg must be {ALG}, got {header.get('alg')!r}")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise MalformedError("JWS header needs a string kid (DID URL)")
    resolved = resolver.resolve(kid)
    try:
        verified = jws.deserialize_compact(
            token, _public_jwk(resolved.public_key.raw), algorithms=[ALG], registry=_REGISTRY
        )
    except JoseError as exc:
        raise InvalidSignature(f"JWS signature by {kid} does not verify: {exc}") from exc
    if verified.payload != payload:  # pragma: no cover - joserfc decodes the same bytes
        raise MalformedError("JWS payload mismatch")
    claims = _claims(payload)
    if proof_purpose not in resolved.purposes:
        raise KeyNotAuthorized(f"{kid} is not authorized for {proof_purpose}")
    if isinstance(claims.get("iss"), str) and resolved.controller != claims["iss"]:
        raise KeyNotAuthorized(f"{kid} is controlled by {resolved.controller}, not {claims['iss']}")
    return header, claims, resolved


def _split(token: object) -> tuple[dict[str, Any], bytes]:
    """Strictly decode a compact JWS's header (JSON object) and payload, before any crypto."""
    if not isinstance(token, str):
        raise MalformedError("not a compact JWS")
    try:
        parts = split_compact(token, max_len=MAX_TOKEN_CHARS, max_header=_MAX_HEADER_CHARS,
                              max_signature=_SIG_CHARS)
    except ValueError as exc:
        raise MalformedError(f"bad JWS: {exc}") from exc
    if "b64" in parts.header or "crit" in parts.header:
        raise MalformedError("JWS header members b64/crit are not supported")
    return parts.header, parts.payload


def _claims(payload: bytes) -> dict[str, Any]:
    try:
        claims = strict_json.loads(payload, max_bytes=MAX_TOKEN_CHARS)
    except ValueError as exc:
        raise MalformedError(f"JWT payload is not strict JSON: {exc}") from exc
    if not isinstance(claims, dict):
        raise MalformedError("JWT payload is not a JSON object")
    return claims


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a compact JWS *without* checking its signature (for one's own tokens)."""
    return _claims(_split(token)[1])


def credential_to_claims(credential: Mapping[str, Any], *, iat: datetime | None = None) -> dict[str, Any]:
    """Map a credential to VC-JWT claims (mapped members move out of ``vc``)."""
    vc = {k: v for k, v in credential.items() if k != "proof"}
    claims: dict[str, Any] = {}
    issuer = vc.pop("issuer", None)
    if isinstance(issuer, Mapping):
        claims["iss"] = issuer.get("id")
        if len(issuer) > 1:
            vc["issuer"] = dict(issuer)  # keep name etc.; iss carries the id
    elif issuer is not None:
        claims["iss"] = issuer
    for member, claim in (("issuanceDate", "nbf"), ("validFrom", "nbf"),
                          ("expirationDate", "exp"), ("validUntil", "exp")):
        if member in vc:
            claims[claim] = _epoch(vc.pop(member))
    if "id" in vc:
        claims["jti"] = vc.pop("id")
    subject = vc.get("credentialSubject")
    if isinstance(subject, Mapping) and isinstance(subject.get("id"), str):
        claims["sub"] = subject["id"]
        vc["credentialSubject"] = {k: v for k, v in subject.items() if k != "id"}
    claims["iat"] = int((iat or datetime.now().astimezone()).timestamp())
    claims["vc"] = vc
    return claims


_JWT_ONLY = frozenset({"iss", "sub", "jti", "iat", "nbf", "exp", "aud", "cnf", "nonce"})


def claims_to_credential(claims: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`credential_to_claims`; conflicting duplicates are malformed."""
    vc = claims.get("vc")
    if vc is None and "@context" in claims:  # VC-JOSE-COSE (2.0): the payload is the credential
        return {k: v for k, v in claims.items() if k not in _JWT_ONLY}
    if not isinstance(vc, Mapping):
        raise MalformedError("JWT has no 'vc' object claim")
    cred = dict(vc)
    v1 = _is_v1(cred)

    def put(member: str, value: Any) -> None:
        if member in cred and cred[member] != value:
            raise MalformedError(f"JWT claim and vc.{member} disagree")
        cred[member] = value

    iss = claims.get("iss")
    if iss is not None:
        if isinstance(cred.get("issuer"), Mapping):
            if cred["issuer"].get("id", iss) != iss:
                raise MalformedError("JWT iss and vc.issuer.id disagree")
            cred["issuer"] = {**cred["issuer"], "id": iss}
        else:
            put("issuer", iss)
    try:
        if "nbf" in claims:
            member = "issuanceDate" if v1 else "validFrom"
            nbf = from_timestamp(claims["nbf"])
            if member in cred and parse_datetime(cred[member]) != nbf:
                raise MalformedError(f"JWT nbf and vc.{member} disagree")
            cred[member] = cred.get(member, format_datetime(nbf))
        if "exp" in claims:
            member = "expirationDate" if v1 else "validUntil"
            exp = from_timestamp(claims["exp"])
            if member in cred and parse_datetime(cred[member]) != exp:
                raise MalformedError(f"JWT exp and vc.{member} disagree")
            cred[member] = cred.get(member, format_datetime(exp))
    except (TypeError, ValueError, OverflowError, OSError) as exc:
        raise MalformedError(f"bad nbf/exp: {exc}") from exc
    if "jti" in claims:
        put("id", claims["jti"])
    if "sub" in claims:
        subject = cred.get("credentialSubject")
        if isinstance(subject, Mapping):
            if subject.get("id", claims["sub"]) != claims["sub"]:
                raise MalformedError("JWT sub and credentialSubject.id disagree")
            rest = {k: v for k, v in subject.items() if k != "id"}
            cred["credentialSubject"] = {"id": claims["sub"], **rest}
    return cred


def presentation_to_claims(
    presentation: Mapping[str, Any], *, challenge: str, domain: str | None, iat: datetime | None = None
) -> dict[str, Any]:
    vp = dict(presentation)
    claims: dict[str, Any] = {}
    holder = vp.pop("holder", None)
    if holder is not None:
        claims["iss"] = holder
    if "id" in vp:
        claims["jti"] = vp.pop("id")
    claims["nonce"] = challenge
    if domain is not None:
        claims["aud"] = domain
    now = int((iat or datetime.now().astimezone()).timestamp())
    claims["iat"] = now
    claims["nbf"] = now
    claims["vp"] = vp
    return claims


def claims_to_presentation(claims: Mapping[str, Any]) -> dict[str, Any]:
    vp = claims.get("vp")
    if not isinstance(vp, Mapping):
        raise MalformedError("JWT has no 'vp' object claim")
    pres = dict(vp)
    if "iss" in claims:
        if pres.get("holder", claims["iss"]) != claims["iss"]:
            raise MalformedError("JWT iss and vp.holder disagree")
        pres["holder"] = claims["iss"]
    if "jti" in claims:
        pres.setdefault("id", claims["jti"])
    return pres


__all__ = [
    "unverified_claims",
    "MAX_TOKEN_CHARS",
    "sign_jwt",
    "verify_jwt",
    "credential_to_claims",
    "claims_to_credential",
    "presentation_to_claims",
    "claims_to_presentation",
]
