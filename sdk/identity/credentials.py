"""Issue and verify Verifiable Credentials (VC Data Model 2.0 and 1.1).

Proof formats: ``"eddsa-jcs-2022"`` (Data Integrity, a dict) and ``"jwt"`` (VC-JWT 1.1, a
compact JWS string). ``verify_credential`` never raises for bad input: it returns a
:class:`VerificationResult` whose ``errors`` name every failed check. Trust is explicit:
pass a :class:`TrustPolicy` (``TrustPolicy.ANY`` when any issuer whose proof verifies will do).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

from sdk.identity.datetimes import as_now, as_skew
from sdk.identity.resolver import Resolver, as_resolver
from sdk.identity.results import VerificationResult
from sdk.identity.status_list import StatusChecker, as_status_checker
from sdk.identity.trust import TrustPolicy
from sdk.identity.vc import (
    DEFAULT_SKEW,
    PROOF_FORMATS,
    V1_CONTEXT,
    V2_CONTEXT,
    check_credential,
    context_version,
    issue_credential,
    issuer_id,
    subject_ids,
)

log = logging.getLogger(__name__)


def bad_arguments(result: VerificationResult, exc: Exception) -> VerificationResult:
    """Record a caller mistake (wrong argument types) as a ``malformed`` result."""
    log.warning("verification refused: bad arguments: %s", exc)
    result.add_error("malformed", f"bad verification arguments: {exc}")
    return result


def verify_credential(
    credential: Mapping[str, Any] | str,
    *,
    trust: TrustPolicy,
    resolver: Resolver | Mapping[str, str] | None = None,
    now: datetime | float | None = None,
    skew: timedelta | float = DEFAULT_SKEW,
    status: StatusChecker | Callable[[str], Any] | Mapping[str, Any] | None = None,
    check_status: bool = True,
) -> VerificationResult:
    """Verify proof, issuer control and purpose, validity period, status and the trust policy.

    ``trust`` says which issuer may issue which types (``TrustPolicy.ANY``: any issuer).
    ``status`` (a :class:`StatusChecker`, a :class:`StatusListStore`, a ``url -> status list
    credential`` callable or a dict) is required for credentials that carry
    ``credentialStatus`` unless ``check_status=False``.
    """
    try:
        if not isinstance(trust, TrustPolicy):
            raise TypeError("trust must be a TrustPolicy (TrustPolicy.ANY accepts any issuer)")
        res = as_resolver(resolver)
        checker = as_status_checker(status, res)
        when, tol = as_now(now), as_skew(skew)
    except TypeError as exc:
        return bad_arguments(VerificationResult(), exc)
    return check_credential(credential, resolver=res, now=when, skew=tol, trust=trust,
                            status=checker, check_status=check_status)


__all__ = [
    "issue_credential",
    "verify_credential",
    "check_credential",
    "context_version",
    "issuer_id",
    "subject_ids",
    "V1_CONTEXT",
    "V2_CONTEXT",
    "PROOF_FORMATS",
    "DEFAULT_SKEW",
]
