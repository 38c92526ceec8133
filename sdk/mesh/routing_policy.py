"""Gray release on the mesh: a signed, retained routing policy splitting a model's traffic by version.

An operator holding a ``MeshPolicyCredential`` (from an issuer the routers trust for that type;
``credentialSubject.models`` lists the models it may steer, ``"*"`` any) publishes

    autoglm/v1/inf/policy/{model}   type inference.routing_policy, retained, no expiry
    {"model": "...", "seq": 7, "weights": {"2": 10}}

meaning 10 % of the model's requests go to nodes whose metadata ``version`` is ``"2"`` and the
rest to nodes of the versions not listed. ``weights: {}`` (or a policy cleared with a higher
``seq``) routes on load alone again. Routers keep, per model, the policy with the highest
``seq`` they verified, whoever signed it, so an old policy replayed by the broker never wins;
an unsigned one, or one from a DID without a covering credential, is rejected before it is read.

A request's share is decided by its ``request_id`` (the same id always lands on the same
side) or, without one, by the router's seeded RNG.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sdk.identity import V2_CONTEXT, Key, TrustPolicy, issue_credential
from sdk.mesh.capacity import AdvertFieldError
from sdk.messaging import topics
from sdk.messaging.authz import CredentialRequirement
from sdk.messaging.envelope import Message

log = logging.getLogger(__name__)

POLICY = "inference.routing_policy"
POLICY_CREDENTIAL = "MeshPolicyCredential"
#: Subscription filter over every model's routing policy.
ALL_POLICIES = f"{topics.ROOT}/inf/policy/+"
MAX_VERSIONS = 16
_MAX_SEQ = 2**53 - 1


def policy_topic(model: str) -> str:
    """The retained topic of ``model``'s routing policy (a hashed level for names unsafe in a topic)."""
    try:
        level = topics.validate_id(model, what="model")
    except ValueError:
        level = "h-" + hashlib.sha256(model.encode()).hexdigest()[:32]
    return f"{topics.ROOT}/inf/policy/{level}"


@dataclass(frozen=True)
class RoutingPolicy:
    """A model's traffic split: percent of requests per version (the rest to unlisted versions)."""

    model: str
    seq: int
    weights: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model or len(self.model) > 256:
            raise AdvertFieldError("policy.model", "must be a non-empty string of at most 256 characters")
        if type(self.seq) is not int or not 1 <= self.seq <= _MAX_SEQ:
            raise AdvertFieldError("policy.seq", "must be an integer in [1, 2^53-1]")
        if not isinstance(self.weights, Mapping) or len(self.weights) > MAX_VERSIONS:
            raise AdvertFieldError("policy.weights", f"must be an object of at most {MAX_VERSIONS} versions")
        total = 0.0
        for version, pct in self.weights.items():
            if not isinstance(version, str) or not version or len(version) > 64 or not version.isprintable():
                raise AdvertFieldError("policy.weights", f"version {version!r} must be a printable string (<= 64)")
            if type(pct) not in (int, float) or not math.isfinite(pct) or not 0 <= pct <= 100:
                raise AdvertFieldError("policy.weights", f"weight of {version!r} must be a percent in [0, 100]")
            total += pct
        if total > 100 + 1e-9:
            raise AdvertFieldError("policy.weights", f"weights sum to {total:g} %, over 100 %")

    def to_body(self) -> dict[str, Any]:
        return {"model": self.model, "seq": self.seq, "weights": dict(self.weights)}

    @classmethod
    def from_body(cls, body: Any) -> RoutingPolicy:
        """Parse a policy body; :class:`AdvertFieldError` (a ``ValueError``) when malformed."""
        if not isinstance(body, dict) or set(body) - {"model", "seq", "weights"}:
            raise AdvertFieldError("policy", "must be an object with model, seq and weights only")
        weights = body.get("weights", {})
        if not isinstance(weights, dict):
            raise AdvertFieldError("policy.weights", "must be an object")
        return cls(model=body.get("model"), seq=body.get("seq"), weights=dict(weights))  # type: ignore[arg-type]

    def choose(self, point: float) -> tuple[str | None, frozenset[str]]:
        """For a point in [0, 100): ``(version, listed)``; version None means "an unlisted version"."""
        cumulative = 0.0
        for version in sorted(self.weights):
            cumulative += self.weights[version]
            if point < cumulative:
                return version, frozenset(self.weights)
        return None, frozenset(self.weights)


def issue_policy_credential(issuer: Key, subject: str, *, models: Iterable[str] = ("*",),
                            valid_until: str | None = None, credential_status: Any = None,
                            proof_format: str = "eddsa-jcs-2022") -> Any:
    """Issue a ``MeshPolicyCredential``: ``subject`` may publish routing policies for ``models``."""
    names = list(models)
    if not names or not all(isinstance(m, str) and m for m in names):
        raise ValueError("models must be non-empty strings")
    cred: dict[str, Any] = {"@context": [V2_CONTEXT], "type": ["VerifiableCredential", POLICY_CREDENTIAL],
                            "credentialSubject": {"id": subject.partition("#")[0], "models": names}}
    if valid_until is not None:
        cred["validUntil"] = valid_until
    return issue_credential(cred, issuer, proof_format=proof_format, credential_status=credential_status)


def _covers(result: Any, msg: Message) -> bool:
    subject = (getattr(result, "credential", None) or {}).get("credentialSubject")
    models = subject.get("models") if isinstance(subject, Mapping) else None
    body = msg.body if isinstance(msg.body, dict) else {}
    model = body.get("model")
    if not isinstance(models, list) or not isinstance(model, str):
        return False
    if "*" not in models and model not in models:
        log.warning("routing policy for %r from %s: its %s does not cover the model", model, msg.sender,
                    POLICY_CREDENTIAL)
        return False
    return msg.topic == policy_topic(model)


def policy_requirement(trust: TrustPolicy, *, verify_options: Mapping[str, Any] | None = None) -> CredentialRequirement:
    """What a policy's signer must present: a trusted ``MeshPolicyCredential`` covering the model."""
    return CredentialRequirement(POLICY_CREDENTIAL, trust, check=_covers, verify_options=dict(verify_options or {}))


def policy_version(msg: Message) -> tuple[str, int] | None:
    """State order of policies: per model, by the signed ``seq`` (None: not a policy)."""
    body = msg.body
    if msg.type != POLICY or not isinstance(body, dict):
        return None
    model, seq = body.get("model"), body.get("seq")
    if not isinstance(model, str) or type(seq) is not int or msg.topic != policy_topic(model):
        return None
    return model, seq


async def publish_policy(client: Any, policy: RoutingPolicy, *, credentials: list[Any] | None = None) -> None:
    """Sign and publish ``policy`` retained (no expiry) through a connected ``SecureClient``;
    ``credentials`` default to the client's own (its ``MeshPolicyCredential``)."""
    creds = credentials if credentials is not None else list(getattr(client, "credentials", ()) or ()) or None
    await client.publish(policy_topic(policy.model), policy.to_body(), type=POLICY, retain=True, ttl=None,
                         credentials=creds)


class PolicyBook:
    """A router's routing policies: per model the highest ``seq`` verified, and the split it makes."""

    def __init__(self, *, seed: int | None = None) -> None:
        self._policies: dict[str, RoutingPolicy] = {}
        self._rng = random.Random(seed)
        self.rejected = 0

    def offer(self, msg: Message) -> bool:
        """Take a verified policy message; False (logged) when malformed or not newer."""
        try:
            policy = RoutingPolicy.from_body(msg.body)
        except ValueError as exc:
            self.rejected += 1
            log.warning("rejected routing policy on %r from %s: %s", msg.topic, msg.sender, exc)
            return False
        held = self._policies.get(policy.model)
        if held is not None and policy.seq <= held.seq:
            log.info("ignored routing policy %d for %r from %s: %d is held", policy.seq, policy.model, msg.sender,
                     held.seq)
            return False
        self._policies[policy.model] = policy
        log.info("routing policy %d for %r from %s: %s", policy.seq, policy.model, msg.sender,
                 dict(policy.weights) or "load only")
        return True

    def get(self, model: str) -> RoutingPolicy | None:
        return self._policies.get(model)

    def point(self, request_id: str | None) -> float:
        """Where a request falls in [0, 100): from its id when it has one, else the seeded RNG."""
        if request_id:
            digest = hashlib.sha256(request_id.encode("utf-8", "surrogatepass")).digest()
            return int.from_bytes(digest[:8], "big") / 2**64 * 100
        return self._rng.random() * 100

    def versions_for(self, model: str, request_id: str | None) -> tuple[str | None, frozenset[str]] | None:
        """None (no split for the model), else ``choose``'s answer for this request."""
        policy = self._policies.get(model)
        if policy is None or not policy.weights:
            return None
        return policy.choose(self.point(request_id))


__all__ = ["ALL_POLICIES", "POLICY", "POLICY_CREDENTIAL", "PolicyBook", "RoutingPolicy", "issue_policy_credential",
           "policy_requirement", "policy_topic", "policy_version", "publish_policy"]
