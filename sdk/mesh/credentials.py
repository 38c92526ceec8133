"""``InferenceAccessCredential``: who may generate on a node, for which models and how many tokens.

The credential's subject carries ``scope = {"models": [...], "maxTokens": n}`` (``"*"`` in models
allows any model; no ``maxTokens``: no limit). A node accepts a request only when the envelope's
sender holds one from an issuer its ``TrustPolicy`` trusts for this type, not revoked, whose scope
covers the model and the requested ``max_new_tokens``. Refusals carry distinct reasons:
``not_authorized``, ``revoked``, ``scope_model``, ``scope_max_tokens``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sdk.identity import V2_CONTEXT, Key, issue_credential, verify_credential
from sdk.mesh.protocol import Refusal
from sdk.messaging.authz import Authorizer, CredentialRequirement
from sdk.messaging.envelope import Message
from sdk.messaging.errors import NotAuthorized

log = logging.getLogger(__name__)

ACCESS_CREDENTIAL = "InferenceAccessCredential"


@dataclass(frozen=True)
class AccessScope:
    """What an access credential allows: model names (``"*"``: any) and a max_new_tokens cap."""

    models: tuple[str, ...] = ("*",)
    max_tokens: int | None = None

    def refusal(self, model: str, max_tokens: int) -> str | None:
        """The refusal reason for this request, or None when the scope covers it."""
        if "*" not in self.models and model not in self.models:
            return "scope_model"
        if self.max_tokens is not None and max_tokens > self.max_tokens:
            return "scope_max_tokens"
        return None


def issue_access_credential(
    issuer: Key,
    subject: str,
    *,
    models: Iterable[str] = ("*",),
    max_tokens: int | None = None,
    valid_until: str | None = None,
    credential_status: Any = None,
    proof_format: str = "eddsa-jcs-2022",
) -> Any:
    """Issue an ``InferenceAccessCredential`` to ``subject`` (a DID) signed by ``issuer``."""
    scope: dict[str, Any] = {"models": list(models)}
    if not scope["models"] or not all(isinstance(m, str) and m for m in scope["models"]):
        raise ValueError("models must be non-empty strings")
    if max_tokens is not None:
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError("max_tokens must be a positive integer")
        scope["maxTokens"] = max_tokens
    cred: dict[str, Any] = {
        "@context": [V2_CONTEXT],
        "type": ["VerifiableCredential", ACCESS_CREDENTIAL],
        "credentialSubject": {"id": subject.partition("#")[0], "scope": scope},
    }
    if valid_until is not None:
        cred["validUntil"] = valid_until
    return issue_credential(cred, issuer, proof_format=proof_format, credential_status=credential_status)


def access_scope(credential: Mapping[str, Any] | None) -> AccessScope:
    """The scope of a (verified) credential document; ``ValueError`` when it is malformed."""
    subject = (credential or {}).get("credentialSubject")
    if isinstance(subject, list) and subject:
        subject = subject[0]
    scope = subject.get("scope") if isinstance(subject, Mapping) else None
    if not isinstance(scope, Mapping):
        raise ValueError("credentialSubject.scope is missing")
    models = scope.get("models", ["*"])
    limit = scope.get("maxTokens")
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise ValueError("scope.models must be a list of strings")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise ValueError("scope.maxTokens must be a positive integer")
    return AccessScope(tuple(models), limit)


class AccessPolicy:
    """A node's admission rule: trusted issuers (``TrustPolicy``) plus a status list source.

    Uses the messaging layer's authorization hook (:class:`CredentialRequirement` checked by an
    :class:`Authorizer`, grants cached) and then the scope; a refusal is re-examined once to tell
    ``revoked`` from ``not_authorized``.
    """

    def __init__(self, trust: Any, *, status: Any = None, resolver: Any = None,
                 recheck_interval: float = 300.0) -> None:
        options: dict[str, Any] = {}
        if status is not None:
            options["status"] = status
        if resolver is not None:
            options["resolver"] = resolver
        self.requirement = CredentialRequirement(ACCESS_CREDENTIAL, trust, recheck_interval=recheck_interval,
                                                 verify_options=options)
        self.authorizer = Authorizer()
        self._scopes: dict[tuple[str, str], tuple[float, AccessScope]] = {}

    def check(self, msg: Message, *, model: str, max_tokens: int) -> AccessScope:
        """The granting scope, or raise :class:`Refusal` with the reason."""
        try:
            result = self.authorizer.authorize(msg, self.requirement)
        except NotAuthorized as exc:
            reason = self._why(msg)
            log.warning("refused %s: %s (%s)", msg.sender, reason, exc)
            raise Refusal(f"{ACCESS_CREDENTIAL} refused: {reason}", reason=reason) from None
        try:
            scope = access_scope(getattr(result, "credential", None))
        except ValueError as exc:
            log.warning("refused %s: malformed scope: %s", msg.sender, exc)
            raise Refusal(f"{ACCESS_CREDENTIAL} has no valid scope", reason="not_authorized") from None
        reason = scope.refusal(model, max_tokens)
        if reason is None:
            return scope
        other = self._other_scope(msg, model, max_tokens)  # a peer may hold several scoped credentials
        if other is not None:
            return other
        log.info("refused %s: %s (model %r, max_new_tokens %d)", msg.sender, reason, model, max_tokens)
        raise Refusal(f"credential scope does not cover model {model!r} with {max_tokens} tokens", reason=reason)

    def _other_scope(self, msg: Message, model: str, max_tokens: int) -> AccessScope | None:
        """A scope covering the request from any of the message's other access credentials (cached)."""
        now = time.time()
        key = (msg.sender, model)
        hit = self._scopes.get(key)
        if hit is not None and now < hit[0] and hit[1].refusal(model, max_tokens) is None:
            return hit[1]
        req = self.requirement
        for cred in msg.credentials:
            try:
                result = verify_credential(cred, now=now, trust=req.trust, **req.verify_options)
                scope = access_scope(result.credential)
            except Exception:  # noqa: BLE001 - a bad or unscoped credential grants nothing
                continue
            if (result.verified and ACCESS_CREDENTIAL in (result.types or []) and result.subject == msg.sender
                    and req.trust.allows(result.issuer, result.types) and scope.refusal(model, max_tokens) is None):
                until = now + req.recheck_interval
                if result.expires_at is not None:
                    until = min(until, result.expires_at.timestamp())
                if len(self._scopes) >= 10_000:
                    self._scopes.clear()
                self._scopes[key] = (until, scope)
                return scope
        return None

    def _why(self, msg: Message) -> str:
        """``revoked`` if a credential of the right type fails only on its status, else ``not_authorized``."""
        req = self.requirement
        for cred in msg.credentials:
            try:
                result = verify_credential(cred, trust=req.trust, **req.verify_options)
            except Exception:  # noqa: BLE001 - a bad credential is simply not a grant
                continue
            if ACCESS_CREDENTIAL in (result.types or []) and result.subject == msg.sender and \
                    ("revoked" in result.errors or "suspended" in result.errors):
                return "revoked"
        return "not_authorized"

    def status_changed(self, status_list_url: str) -> None:
        """Forget grants that depend on this status list (call when it is republished)."""
        self.authorizer.status_changed(status_list_url)
        self._scopes.clear()


__all__ = ["ACCESS_CREDENTIAL", "AccessScope", "AccessPolicy", "issue_access_credential", "access_scope"]
