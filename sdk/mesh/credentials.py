"""The mesh's two credentials: who may generate on a node, and who may be a node.

``InferenceAccessCredential`` (held by peers): the subject carries ``scope = {"models": [...],
"maxTokens": n}`` (``"*"`` in models allows any model; no ``maxTokens``: no limit). A node accepts
a request only when the envelope's sender holds one from an issuer its ``TrustPolicy`` trusts for
this type, not revoked, whose scope covers the model and the requested ``max_new_tokens``.
Refusals carry distinct reasons: ``not_authorized``, ``revoked``, ``scope_model``,
``scope_max_tokens``.

``InferenceNodeCredential`` (held by nodes): the subject (the node's DID) carries ``models``
(``"*"``: any) and optionally ``nodeIds``. A node attaches it to its signed adverts; a router
(:class:`NodePolicy`) keeps a node only when the credential is from an issuer trusted for this
type, not revoked, its subject is the advert's signer, it covers every advertised model, and the
node id is the DID's token (``sdk.messaging.topics.client_token``) or listed in ``nodeIds``.

Both policies follow status lists live (:class:`sdk.mesh.revocation.LiveStatus`): a new list
drops cached grants at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sdk.identity import V2_CONTEXT, Key, TrustPolicy, issue_credential, verify_credential
from sdk.mesh.adverts import NodeAdvert
from sdk.mesh.protocol import Refusal
from sdk.mesh.revocation import LiveStatus
from sdk.messaging import topics
from sdk.messaging.authz import Authorizer, CredentialRequirement
from sdk.messaging.envelope import Message
from sdk.messaging.errors import NotAuthorized

log = logging.getLogger(__name__)

ACCESS_CREDENTIAL = "InferenceAccessCredential"
NODE_CREDENTIAL = "InferenceNodeCredential"


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
    """A node's admission rule: trusted issuers (``TrustPolicy``) plus live status lists.

    Uses the messaging layer's authorization hook (:class:`CredentialRequirement` checked by an
    :class:`Authorizer`, grants cached) and then the scope; a refusal says ``revoked`` (or
    ``suspended``) when that is why, else ``not_authorized``. ``status`` seeds the status lists (a ``StatusChecker``,
    a ``url -> credential`` callable or dict, or a :class:`LiveStatus`); the node attaches
    :attr:`status` to its connection, and every new list drops the grants at once.
    """

    def __init__(self, trust: Any, *, status: Any = None, resolver: Any = None,
                 recheck_interval: float = 300.0) -> None:
        self.status = status if isinstance(status, LiveStatus) else LiveStatus(
            status, trust=trust if isinstance(trust, TrustPolicy) else None, resolver=resolver)
        options: dict[str, Any] = {"status": self.status.checker}
        if resolver is not None:
            options["resolver"] = resolver
        self.requirement = CredentialRequirement(ACCESS_CREDENTIAL, trust, recheck_interval=recheck_interval,
                                                 verify_options=options)
        self.authorizer = Authorizer()
        self._bound: list[Authorizer] = []
        self._scopes: dict[tuple[str, str], tuple[float, AccessScope]] = {}
        self.status.add_listener(self.status_changed)

    def bind(self, authorizer: Authorizer) -> None:
        """Also drop ``authorizer``'s grants on status changes (a client checking :attr:`requirement`)."""
        if authorizer is not self.authorizer and authorizer not in self._bound:
            self._bound.append(authorizer)

    def check(self, msg: Message, *, model: str, max_tokens: int, authorizer: Authorizer | None = None) -> AccessScope:
        """The granting scope, or raise :class:`Refusal` with the reason (``authorizer``: whose
        grant cache to use, default the policy's own)."""
        try:
            result = (authorizer or self.authorizer).authorize(msg, self.requirement)
        except NotAuthorized as exc:
            reason = exc.reason if exc.reason in ("revoked", "suspended") else "not_authorized"
            log.warning("refused %s: %s (%s)", msg.sender, reason, exc)
            raise Refusal(f"{ACCESS_CREDENTIAL} refused: {reason}", reason=reason) from None
        try:
            scope = access_scope(getattr(result, "credential", None))
        except ValueError as exc:
            log.warning("refused %s: malformed scope: %s", msg.sender, exc)
            raise Refusal(f"{ACCESS_CREDENTIAL} has no valid scope", reason="not_authorized") from None
        scope_reason = scope.refusal(model, max_tokens)
        if scope_reason is None:
            return scope
        other = self._other_scope(msg, model, max_tokens)  # a peer may hold several scoped credentials
        if other is not None:
            return other
        log.info("refused %s: %s (model %r, max_new_tokens %d)", msg.sender, scope_reason, model, max_tokens)
        raise Refusal(f"credential scope does not cover model {model!r} with {max_tokens} tokens",
                      reason=scope_reason)

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

    def status_changed(self, status_list_url: str) -> None:
        """Forget grants that depend on this status list (called on every new list)."""
        self.authorizer.status_changed(status_list_url)
        for authorizer in self._bound:
            authorizer.status_changed(status_list_url)
        self._scopes.clear()


# ------------------------------------------------------------------ node credentials


@dataclass(frozen=True)
class NodeGrant:
    """What an ``InferenceNodeCredential`` allows its subject: models (``"*"``: any) and node ids."""

    models: tuple[str, ...]
    node_ids: tuple[str, ...] = ()

    def covers(self, model: str) -> bool:
        return "*" in self.models or model in self.models

    def refusal(self, advert: NodeAdvert, sender: str) -> str | None:
        """Why ``advert`` signed by ``sender`` is not covered (``None``: it is)."""
        if advert.did != sender:
            return "wrong_did"
        if advert.node_id not in self.node_ids and advert.node_id != _token(sender):
            return "node_id_not_bound"
        if not all(self.covers(m) for m in advert.models):
            return "model_not_covered"
        return None


def _token(did: str) -> str | None:
    try:
        return topics.client_token(did)
    except (TypeError, ValueError):
        return None


def issue_node_credential(
    issuer_key: Key,
    node_did: str,
    *,
    models: Iterable[str],
    node_ids: Iterable[str] = (),
    valid_for: float | timedelta | None = None,
    valid_until: str | None = None,
    credential_status: Any = None,
    proof_format: str = "eddsa-jcs-2022",
) -> Any:
    """Issue an ``InferenceNodeCredential``: ``node_did`` may serve ``models`` on the mesh.

    ``node_ids``: node ids the DID may advertise besides its own token (``client_token(did)``);
    ``valid_for`` (seconds or a ``timedelta``) sets ``validUntil`` from now.
    """
    names = list(models)
    if not names or not all(isinstance(m, str) and m for m in names):
        raise ValueError("models must be non-empty strings")
    ids = list(node_ids)
    for node_id in ids:
        topics.validate_id(node_id, what="node id")
    if valid_for is not None and valid_until is not None:
        raise ValueError("give valid_for or valid_until, not both")
    if valid_for is not None:
        span = valid_for if isinstance(valid_for, timedelta) else timedelta(seconds=float(valid_for))
        if span <= timedelta(0):
            raise ValueError("valid_for must be positive")
        valid_until = (datetime.now(UTC) + span).strftime("%Y-%m-%dT%H:%M:%SZ")
    subject: dict[str, Any] = {"id": node_did.partition("#")[0], "models": names}
    if ids:
        subject["nodeIds"] = ids
    cred: dict[str, Any] = {
        "@context": [V2_CONTEXT],
        "type": ["VerifiableCredential", NODE_CREDENTIAL],
        "credentialSubject": subject,
    }
    if valid_until is not None:
        cred["validUntil"] = valid_until
    return issue_credential(cred, issuer_key, proof_format=proof_format, credential_status=credential_status)


def node_grant(credential: Mapping[str, Any] | None) -> NodeGrant:
    """The grant of a (verified) node credential document; ``ValueError`` when it is malformed."""
    subject = (credential or {}).get("credentialSubject")
    if isinstance(subject, list) and len(subject) == 1:
        subject = subject[0]
    if not isinstance(subject, Mapping):
        raise ValueError("credentialSubject must be one object")
    models, ids = subject.get("models"), subject.get("nodeIds", [])
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise ValueError("credentialSubject.models must be a non-empty list of strings")
    if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
        raise ValueError("credentialSubject.nodeIds must be a list of strings")
    return NodeGrant(tuple(models), tuple(ids))


class NodePolicy:
    """A router's rule for which nodes it uses: issuers trusted for ``InferenceNodeCredential``.

    :attr:`requirement` is checked on every advert (the messaging layer's authorization hook:
    proof, trust, status list, subject = signer; grants cached until the credential expires) and
    its ``check`` binds the advert to the credential (node id and models,
    :meth:`NodeGrant.refusal`). ``status`` as for :class:`AccessPolicy`; the router attaches
    :attr:`status` to its connection.
    """

    def __init__(self, trust: TrustPolicy, *, status: Any = None, resolver: Any = None,
                 recheck_interval: float = 300.0, skew: float | None = None) -> None:
        if not isinstance(trust, TrustPolicy):
            raise TypeError("trust must be a TrustPolicy naming issuers trusted for InferenceNodeCredential")
        self.trust = trust
        self.status = status if isinstance(status, LiveStatus) else LiveStatus(
            status, trust=trust if isinstance(trust, TrustPolicy) else None, resolver=resolver)
        options: dict[str, Any] = {"status": self.status.checker}
        if resolver is not None:
            options["resolver"] = resolver
        if skew is not None:  # clock skew allowed on validity periods (the identity layer's default otherwise)
            options["skew"] = skew
        self.requirement = CredentialRequirement(NODE_CREDENTIAL, trust, check=self._covers,
                                                 recheck_interval=recheck_interval, verify_options=options)

    @classmethod
    def trusting(cls, *issuers: str, **options: Any) -> NodePolicy:
        """A policy trusting ``issuers`` (DIDs) for ``InferenceNodeCredential``."""
        return cls(TrustPolicy({did: {NODE_CREDENTIAL} for did in issuers}), **options)

    @staticmethod
    def _covers(result: Any, msg: Message) -> bool:
        try:
            advert = NodeAdvert.from_body(msg.body)
            grant = node_grant(getattr(result, "credential", None))
        except ValueError as exc:
            log.warning("node credential of %s: %s", msg.sender, exc)
            return False
        reason = grant.refusal(advert, msg.sender)
        if reason is not None:
            log.warning("advert of node %r from %s refused: %s", advert.node_id, msg.sender, reason)
            return False
        return True

    def why(self, msg: Message) -> str | None:
        """Why the credentials on advert ``msg`` do not admit it (``None``: they do); re-verifies,
        for diagnostics: ``no_node_credential``, ``revoked``, ``not_trusted``, or the grant's reason."""
        req = self.requirement
        found = "no_node_credential"
        for cred in msg.credentials:
            try:
                result = verify_credential(cred, trust=req.trust, **req.verify_options)
            except Exception:  # noqa: BLE001 - a bad credential is simply not a grant
                continue
            if NODE_CREDENTIAL not in (result.types or []) or result.subject != msg.sender:
                continue
            if "revoked" in result.errors or "suspended" in result.errors:
                found = "revoked"
                continue
            if not result.verified or not req.trust.allows(result.issuer, result.types):
                found = "not_trusted" if found != "revoked" else found
                continue
            try:
                reason = node_grant(result.credential).refusal(NodeAdvert.from_body(msg.body), msg.sender)
            except ValueError:
                reason = "malformed"
            if reason is None:
                return None
            found = reason
        return found


__all__ = [
    "ACCESS_CREDENTIAL",
    "NODE_CREDENTIAL",
    "AccessScope",
    "AccessPolicy",
    "issue_access_credential",
    "access_scope",
    "NodeGrant",
    "NodePolicy",
    "issue_node_credential",
    "node_grant",
]
