"""Resolve a verification method id to its Ed25519 public key, controller and allowed purposes.

``StaticResolver`` (a fixed table), did:key (built in), did:web (pluggable fetcher), and
``ResolverChain`` (registry by DID method, with a cache) which is the default.
"""

from __future__ import annotations

import hashlib
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


#: did:key verification methods whose key is remembered by default (see :func:`reserve_did_key_cache`)
DID_KEY_CACHE_SIZE = 4096


class _DidKeyCache:
    """did:key verification method -> its raw 32-byte key, least recently used evicted past the bound.

    An entry is a 16-byte digest of the id and the key's bytes (about 190 bytes), not the id string
    and key objects (about 600): a hit builds the small :class:`ResolvedKey` again, a miss decodes
    the base58 key. Only ids whose DID is the canonical encoding of their key are remembered.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._keys: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def resolve(self, verification_method: str) -> ResolvedKey:
        did, sep, _ = verification_method.partition("#")
        if not sep:
            raise ResolutionError(f"a did:key verification method needs a fragment: {verification_method!r}")
        digest = hashlib.blake2b(verification_method.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        raw = self._keys.get(digest)
        if raw is not None:
            with self._lock:
                if digest in self._keys:
                    self._keys.move_to_end(digest)
            return ResolvedKey(verification_method, PublicKey(raw), did, ALL_PURPOSES)
        pub = public_key_from_did_key(verification_method)
        if pub.did == did:  # a decoded canonical did:key: set from the input, nothing re-encoded
            with self._lock:
                self._keys[digest] = bytes(pub.raw)
                while len(self._keys) > self.size:
                    self._keys.popitem(last=False)
        return ResolvedKey(verification_method, pub, pub.did, ALL_PURPOSES)

    def resize(self, size: int) -> None:
        if size <= 0:
            raise ValueError("the did:key cache size must be positive")
        with self._lock:
            self.size = size
            while len(self._keys) > size:
                self._keys.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()


_did_keys = _DidKeyCache(DID_KEY_CACHE_SIZE)


def _resolve_did_key(verification_method: str) -> ResolvedKey:
    return _did_keys.resolve(verification_method)


def did_key_cache_size() -> int:
    """How many did:key verification methods the process remembers."""
    return _did_keys.size


def reserve_did_key_cache(size: int) -> int:
    """Remember at least ``size`` did:key verification methods (never shrinks; returns the bound).

    A verifier of N devices wants a little more than N (a coordinator: its fleet), so re-admitting
    the fleet after a broker restart decodes no key again."""
    if size > _did_keys.size:
        _did_keys.resize(size)
    return _did_keys.size


def resize_did_key_cache(size: int) -> None:
    """Set the did:key cache's bound to ``size`` exactly (least recently used dropped)."""
    _did_keys.resize(size)


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

    Results are cached per verification method id, up to ``max_size`` entries (least recently
    used evicted; :meth:`resize` changes it; call :meth:`clear` after key rotation). did:key ids
    resolved by the built-in method are not kept here: the process-wide did:key cache holds them
    compactly (:func:`reserve_did_key_cache`).
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
        if max_size <= 0:
            raise ValueError("max_size must be positive")
        self._cache: OrderedDict[str, ResolvedKey] = OrderedDict()
        self._max = max_size
        self._lock = threading.Lock()

    @property
    def max_size(self) -> int:
        """The cache's bound (entries)."""
        return self._max

    def resize(self, max_size: int) -> None:
        """Keep up to ``max_size`` resolved keys (the least recently used go first)."""
        if max_size <= 0:
            raise ValueError("max_size must be positive")
        with self._lock:
            self._max = max_size
            while len(self._cache) > max_size:
                self._cache.popitem(last=False)

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
            with self._lock:
                if verification_method in self._cache:
                    self._cache.move_to_end(verification_method)
            return cached
        resolved = self._resolve_uncached(verification_method)
        if isinstance(verification_method, str) and verification_method.startswith("did:key:") \
                and isinstance(self._methods.get("key"), DidKeyResolver):
            return resolved                 # the did:key cache has it
        with self._lock:
            self._cache[verification_method] = resolved
            while len(self._cache) > self._max:
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
    "DID_KEY_CACHE_SIZE",
    "did_key_cache_size",
    "reserve_did_key_cache",
    "resize_did_key_cache",
]
