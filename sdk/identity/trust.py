"""``TrustPolicy``: which issuer may issue which credential types.

Verification always takes one explicitly; ``TrustPolicy.ANY`` is the named policy for the rare
caller that accepts any issuer whose proof verifies (then checking the issuer is its job).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: Types every credential carries; they never need to be allowed explicitly.
BASE_TYPES = frozenset({"VerifiableCredential"})
ANY_TYPE = "*"


@dataclass(frozen=True)
class TrustPolicy:
    """Mapping issuer DID → allowed credential types (``"*"`` allows any type).

    ``TrustPolicy({"did:key:z6Mk...": {"DeviceCredential", "InferenceAccessCredential"}})``
    """

    issuers: Mapping[str, frozenset[str]] = field(default_factory=dict)
    any_issuer: bool = False

    #: Accepts every issuer and type (set below the class).
    ANY: ClassVar[TrustPolicy]

    def __init__(self, issuers: Mapping[str, Iterable[str]] | None = None) -> None:
        table: dict[str, frozenset[str]] = {}
        for issuer, types in (issuers or {}).items():
            if not isinstance(issuer, str) or not issuer:
                raise ValueError("issuer ids must be non-empty strings")
            if isinstance(types, str):
                types = [types]
            table[issuer] = frozenset(types)
        object.__setattr__(self, "issuers", table)
        object.__setattr__(self, "any_issuer", False)

    @classmethod
    def from_config(cls, config: Iterable[Mapping[str, Any]] | Mapping[str, Any]) -> TrustPolicy:
        """Build from ``[{"issuer": did, "types": [...]}, ...]`` or ``{"trusted_issuers": [...]}``."""
        if isinstance(config, Mapping):
            config = config.get("trusted_issuers", config.get("issuers", []))
        table: dict[str, set[str]] = {}
        for entry in config:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("issuer"), str):
                raise ValueError(f"trust entry needs an 'issuer' string: {entry!r}")
            types = entry.get("types", [ANY_TYPE])
            if isinstance(types, str):
                types = [types]
            table.setdefault(entry["issuer"], set()).update(types)
        return cls(table)

    def allow(self, issuer: str, *types: str) -> TrustPolicy:
        """A new policy that also lets ``issuer`` issue ``types``."""
        if self.any_issuer:
            return self
        table = {k: set(v) for k, v in self.issuers.items()}
        table.setdefault(issuer, set()).update(types)
        return TrustPolicy(table)

    def allows(self, issuer: str | None, types: Iterable[str]) -> bool:
        """True if ``issuer`` may issue a credential with all of ``types``."""
        if self.any_issuer:
            return isinstance(issuer, str) and bool(issuer)
        allowed = self.issuers.get(issuer) if issuer else None
        if allowed is None:
            return False
        if ANY_TYPE in allowed:
            return True
        return all(t in allowed or t in BASE_TYPES for t in types)

    def trusts_issuer(self, issuer: str | None) -> bool:
        """True if ``issuer`` may issue anything at all (e.g. its own status lists)."""
        if self.any_issuer:
            return isinstance(issuer, str) and bool(issuer)
        return isinstance(issuer, str) and issuer in self.issuers

    def __hash__(self) -> int:
        return hash((self.any_issuer, frozenset(self.issuers.items())))

    def __repr__(self) -> str:
        if self.any_issuer:
            return "TrustPolicy.ANY"
        table = {i: sorted(t) for i, t in self.issuers.items()}
        return f"TrustPolicy({table!r})"

    def to_config(self) -> list[dict[str, Any]]:
        if self.any_issuer:
            raise ValueError("TrustPolicy.ANY has no configuration form")
        return [{"issuer": i, "types": sorted(t)} for i, t in self.issuers.items()]


def _any_policy() -> TrustPolicy:
    policy = TrustPolicy()
    object.__setattr__(policy, "any_issuer", True)
    return policy


TrustPolicy.ANY = _any_policy()


__all__ = ["TrustPolicy"]
