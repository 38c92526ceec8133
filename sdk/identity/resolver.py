"""Resolve a verification method id to its Ed25519 public key, controller and allowed purposes.

``StaticResolver`` (a fixed table), did:key (built in), did:web (pluggable fetcher), and
``ResolverChain`` (registry by DID method, with a cache) which is the default.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote

from sdk.identity.did_key import public_key_from_did_key
from sdk.identity.errors import InvalidKey, ResolutionError
from sdk.identity.keys import PublicKey

log = logging.getLogger(__name__)

#: Every verification relationship a resolver may report.
ALL_PURPOSES: frozenset[str] = frozenset(
    {"assertionMethod", "authentication", "capabilityInvocation", "capabilityDelegation"}
)


@dataclass(frozen=True)
class ResolvedKey:
    """What a verification method id resolves to."""

    id: str
    public_key: PublicKey
    controller: str
    purposes: frozenset[str] = ALL_PURPOSES


@runtime_checkable
class Resolver(Protocol):
    """Anything that maps a verification method id to a :class:`ResolvedKey`."""

    def resolve(self, verification_method: str) -> ResolvedKey:
        """Return the key, or raise :class:`ResolutionError`."""
        ...


def _controller_of(vm_id: str) -> str:
    return vm_id.partition("#")[0]


class StaticResolver:
    """A fixed table ``{verification_method_id: public_key_multibase | PublicKey}``.

    The controller is the id without its fragment; every purpose is allowed unless
    ``purposes`` narrows it.
    """

    def __init__(
        self,
        keys: Mapping[str, str | PublicKey] | None = None,
        *,
        controllers: Mapping[str, str] | None = None,
        purposes: Iterable[str] = ALL_PURPOSES,
    ) -> None:
        self._purposes = frozenset(purposes)
        self._controllers = dict(controllers or {})
        self._table: dict[str, ResolvedKey] = {}
        for vm_id, key in (keys or {}).items():
            self.add(vm_id, key)

    def add(self, verification_method: str, key: str | PublicKey, *, controller: str | None = None) -> None:
        """Add or replace one entry."""
        if not isinstance(verification_method, str) or not verification_method:
            raise ValueError("verification method id must be a non-empty string")
        pub = key if isinstance(key, PublicKey) else PublicKey.from_multibase(key)
        ctrl = controller or self._controllers.get(verification_method) or _controller_of(verification_method)
        self._table[verification_method] = ResolvedKey(verification_method, pub, ctrl, self._purposes)

    def resolve(self, verification_method: str) -> ResolvedKey:
        try:
            return self._table[verification_method]
        except (KeyError, TypeError):
            pass
        if isinstance(verification_method, str) and verification_method.startswith("did:key:"):
            return _resolve_did_key(verification_method)  # did:key needs no table entry
        raise ResolutionError(f"unknown verification method {verification_method!r}")


@functools.lru_cache(maxsize=4096)
def _resolve_did_key(verification_method: str) -> ResolvedKey:
    if "#" not in verification_method:
        raise ResolutionError(f"a did:key verification method needs a fragment: {verification_method!r}")
    pub = public_key_from_did_key(verification_method)
    return ResolvedKey(verification_method, pub, pub.did, ALL_PURPOSES)


class DidKeyResolver:
    """did:key (Ed25519): the key is in the identifier; every purpose is allowed (cached)."""

    def resolve(self, verification_method: str) -> ResolvedKey:
        if not isinstance(verification_method, str):
            raise ResolutionError("verification method id must be a string")
        return _resolve_did_key(verification_method)


Fetcher = Callable[[str], Mapping[str, Any]]


def did_web_url(did: str) -> str:
    """The https URL of a did:web DID document (W3C did:web method spec)."""
    if not did.startswith("did:web:") or len(did) <= len("did:web:"):
        raise ResolutionError(f"not a did:web DID: {did!r}")
    parts = [unquote(p) for p in did[len("did:web:"):].split(":")]
    if any(not p or "/" in p for p in parts):
        raise ResolutionError(f"malformed did:web DID: {did!r}")
    if len(parts) == 1:
        return f"https://{parts[0]}/.well-known/did.json"
    return "https://" + "/".join(parts) + "/did.json"


def _absolute(ref: str, did: str) -> str:
    return did + ref if ref.startswith("#") else ref


def keys_from_did_document(doc: Mapping[str, Any], did: str) -> dict[str, ResolvedKey]:
    """Every Ed25519 verification method in a DID document, with the relationships naming it."""
    if not isinstance(doc, Mapping) or doc.get("id") != did:
        raise ResolutionError(f"DID document id does not match {did!r}")
    methods: dict[str, Mapping[str, Any]] = {}
    for vm in doc.get("verificationMethod", []) or []:
        if isinstance(vm, Mapping) and isinstance(vm.get("id"), str):
            methods[_absolute(vm["id"], did)] = vm
    purposes: dict[str, set[str]] = {}
    for rel in ALL_PURPOSES:
        for entry in doc.get(rel, []) or []:
            if isinstance(entry, Mapping) and isinstance(entry.get("id"), str):
                vm_id = _absolute(entry["id"], did)
                methods.setdefault(vm_id, entry)
            elif isinstance(entry, str):
                vm_id = _absolute(entry, did)
            else:
                continue
            purposes.setdefault(vm_id, set()).add(rel)
    out: dict[str, ResolvedKey] = {}
    for vm_id, vm in methods.items():
        try:
            if "publicKeyMultibase" in vm:
                pub = PublicKey.from_multibase(vm["publicKeyMultibase"])
            elif "publicKeyJwk" in vm:
                pub = PublicKey.from_jwk(vm["publicKeyJwk"])
            else:
                continue
        except InvalidKey:
            log.info("skipping non-Ed25519 verification method %s", vm_id)
            continue
        controller = vm.get("controller", did)
        out[vm_id] = ResolvedKey(vm_id, pub, controller, frozenset(purposes.get(vm_id, ())))
    return out


class DidWebResolver:
    """did:web through a pluggable ``fetcher(url) -> DID document dict`` (no network by default)."""

    def __init__(self, fetcher: Fetcher) -> None:
        if not callable(fetcher):
            raise TypeError("fetcher must be callable: url -> DID document dict")
        self._fetch = fetcher

    def resolve_document(self, did: str) -> Mapping[str, Any]:
        url = did_web_url(did)
        try:
            doc = self._fetch(url)
        except ResolutionError:
            raise
        except Exception as exc:
            raise ResolutionError(f"fetching {url} failed: {exc}") from exc
        if not isinstance(doc, Mapping):
            raise ResolutionError(f"{url} did not return a JSON object")
        return doc

    def resolve(self, verification_method: str) -> ResolvedKey:
        did = _controller_of(verification_method)
        keys = keys_from_did_document(self.resolve_document(did), did)
        try:
            return keys[verification_method]
        except KeyError:
            raise ResolutionError(f"{verification_method!r} is not in the DID document of {did}") from None


class ResolverChain:
    """Registry by DID method (``"key"``, ``"web"``...) plus fallbacks, with an LRU cache.

    Results are cached per verification method id (did:key forever; others up to ``max_size``
    entries; call :meth:`clear` after key rotation).
    """

    def __init__(
        self,
        methods: Mapping[str, Resolver] | None = None,
        *,
        fallbacks: Iterable[Resolver] = (),
        max_size: int = 4096,
    ) -> None:
        self._methods: dict[str, Resolver] = {"key": DidKeyResolver()}
        self._methods.update(methods or {})
        self._fallbacks = list(fallbacks)
        self._cache: OrderedDict[str, ResolvedKey] = OrderedDict()
        self._max = max_size
        self._lock = threading.Lock()

    def register(self, method: str, resolver: Resolver) -> None:
        """Use ``resolver`` for ``did:<method>:...`` ids."""
        self._methods[method] = resolver
        self.clear()

    def add_fallback(self, resolver: Resolver) -> None:
        """Try ``resolver`` for ids no registered method handles (e.g. a :class:`StaticResolver`)."""
        self._fallbacks.append(resolver)
        self.clear()

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def resolve(self, verification_method: str) -> ResolvedKey:
        cached = self._cache.get(verification_method)
        if cached is not None:
            return cached
        resolved = self._resolve_uncached(verification_method)
        with self._lock:
            self._cache[verification_method] = resolved
            if len(self._cache) > self._max:
                self._cache.popitem(last=False)
        return resolved

    def _resolve_uncached(self, vm_id: str) -> ResolvedKey:
        if not isinstance(vm_id, str):
            raise ResolutionError("verification method id must be a string")
        candidates: list[Resolver] = []
        if vm_id.startswith("did:"):
            method = vm_id.split(":", 2)[1]
            if method in self._methods:
                candidates.append(self._methods[method])
        candidates.extend(self._fallbacks)
        if not candidates:
            raise ResolutionError(f"no resolver for {vm_id!r}")
        last: ResolutionError | None = None
        for resolver in candidates:
            try:
                return resolver.resolve(vm_id)
            except ResolutionError as exc:
                last = exc
        assert last is not None
        raise last


_DEFAULT = ResolverChain()


def default_resolver() -> ResolverChain:
    """The process-wide resolver (did:key only) used when none is given."""
    return _DEFAULT


def as_resolver(resolver: Resolver | Mapping[str, str] | None) -> Resolver:
    """Normalize a ``resolver=`` argument: None → default (did:key), a dict → static + did:key."""
    if resolver is None:
        return _DEFAULT
    if isinstance(resolver, Mapping):
        return ResolverChain(fallbacks=[StaticResolver(resolver)])
    if not hasattr(resolver, "resolve"):
        raise TypeError("resolver must have a resolve(verification_method) method")
    return resolver


__all__ = [
    "ALL_PURPOSES",
    "ResolvedKey",
    "Resolver",
    "StaticResolver",
    "DidKeyResolver",
    "DidWebResolver",
    "ResolverChain",
    "did_web_url",
    "keys_from_did_document",
    "default_resolver",
    "as_resolver",
]
