"""Authorization hook: "the sender must hold credential type T from a trusted issuer".

The credential travels attached to the sender's signed envelope (``vcs``); because the envelope
is signed by the sender's key and the credential's subject must be the sender's DID, the
envelope proves possession. A verified grant is cached per (sender, requirement) until the
credential expires or ``recheck_interval`` passes (status lists are re-checked then), or until
its status list changes (:meth:`Authorizer.status_changed`) or :meth:`Authorizer.invalidate`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sdk.messaging.envelope import Message
from sdk.messaging.errors import NotAuthorized

logger = logging.getLogger(__name__)

#: Credential failures reported with their own reason (a revoked peer learns it was revoked).
_STATUS_REASONS = frozenset({"revoked", "suspended"})


@dataclass(frozen=True, eq=False)
class CredentialRequirement:
    """What a sender must present. ``trust`` is an ``sdk.identity.TrustPolicy``.

    ``check(result, message) -> bool`` may add an app rule (e.g. a model allow-list in the VC);
    ``verify_options`` are extra keyword arguments for ``sdk.identity.verify_credential``
    (resolver, status list source, skew...).
    """

    type: str
    trust: Any
    check: Callable[[Any, Message], bool] | None = None
    recheck_interval: float = 300.0
    verify_options: Mapping[str, Any] = field(default_factory=dict)


def _ts(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _status_urls(credential: Any) -> frozenset[str]:
    status = credential.get("credentialStatus") if isinstance(credential, Mapping) else None
    entries = status if isinstance(status, list) else [status]
    return frozenset(
        e["statusListCredential"] for e in entries
        if isinstance(e, Mapping) and isinstance(e.get("statusListCredential"), str)
    )


class Authorizer:
    """Checks :class:`CredentialRequirement` s against messages, with a grant cache."""

    def __init__(self, *, max_entries: int = 10_000) -> None:
        self._grants: dict[tuple[str, int], tuple[float, Any, frozenset[str]]] = {}
        self._max = max_entries

    def invalidate(self, sender: str | None = None) -> None:
        """Forget cached grants (of one sender, or all)."""
        if sender is None:
            self._grants.clear()
        else:
            for k in [k for k in self._grants if k[0] == sender]:
                del self._grants[k]

    def status_changed(self, status_list_url: str) -> None:
        """Forget grants whose credential points at this status list (call on a list update)."""
        for k in [k for k, g in self._grants.items() if status_list_url in g[2]]:
            del self._grants[k]

    def authorize(self, msg: Message, req: CredentialRequirement, *, now: float | None = None) -> Any:
        """Return the verification result granting access, or raise :class:`NotAuthorized`."""
        now = time.time() if now is None else now
        key = (msg.sender, id(req))
        hit = self._grants.get(key)
        if hit is not None:
            if now < hit[0]:
                if req.check is None or req.check(hit[1], msg):
                    return hit[1]
                raise NotAuthorized(f"{msg.sender} fails the requirement's check for {req.type}")
            del self._grants[key]
        if not msg.credentials:
            raise NotAuthorized(f"{msg.sender} presented no {req.type}")
        try:
            from sdk.identity import verify_credential
        except ImportError as exc:  # pragma: no cover - identity layer not installed
            raise NotAuthorized("credential verification is unavailable") from exc
        problems: list[str] = []
        status_reasons: set[str] = set()  # revoked / suspended: said as such, not as not_authorized
        for cred in msg.credentials:
            try:
                result = verify_credential(cred, **{"now": now, "trust": req.trust, **req.verify_options})
            except Exception as exc:  # noqa: BLE001 - a bad credential is a failed check, not a crash
                problems.append(f"{type(exc).__name__}: {exc}")
                continue
            types = list(getattr(result, "types", []) or [])
            if req.type not in types:
                continue
            if not getattr(result, "verified", False):
                errors = list(getattr(result, "errors", []) or [])
                status_reasons.update(e for e in errors if e in _STATUS_REASONS)
                problems.append(f"{req.type} does not verify: {errors}")
                continue
            subject = getattr(result, "subject", None)
            if subject != msg.sender:
                problems.append(f"{req.type} subject {subject!r} is not the sender")
                continue
            issuer = getattr(result, "issuer", None)
            if not req.trust.allows(issuer, types):
                problems.append(f"issuer {issuer!r} is not trusted for {req.type}")
                continue
            if req.check is not None and not req.check(result, msg):
                problems.append(f"{req.type} fails the requirement's check")
                continue
            until = now + req.recheck_interval
            exp = _ts(getattr(result, "expires_at", None))
            if exp is not None:
                until = min(until, exp)
            if len(self._grants) >= self._max:
                self._grants.clear()
            self._grants[key] = (until, result, _status_urls(getattr(result, "credential", None)))
            return result
        detail = "; ".join(problems) or f"no {req.type} among {len(msg.credentials)} credential(s)"
        reason = next(iter(status_reasons)) if len(status_reasons) == 1 else None
        raise NotAuthorized(f"{msg.sender} not authorized: {detail}", reason=reason)


__all__ = ["CredentialRequirement", "Authorizer"]
