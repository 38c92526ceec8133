"""W3C Bitstring Status List v1.0: the bitstring, status list credentials, entries, checking.

A status list credential is fetched through a pluggable :class:`StatusListSource`
(``url -> credential``: HTTP, a local dict, later an MQTT retained message); its proof is
verified once and the decoded bitstring cached by :class:`StatusChecker`.
"""

from __future__ import annotations

import base64
import gzip
import logging
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from sdk.identity.datetimes import as_now
from sdk.identity.errors import IdentityError, MalformedError, Revoked, StatusUnavailable, Suspended

if TYPE_CHECKING:
    from sdk.identity.keys import Key
    from sdk.identity.resolver import Resolver

log = logging.getLogger(__name__)

MIN_ENTRIES = 131072  # 16 KiB: the spec's minimum, for herd privacy
PURPOSES = ("revocation", "suspension")
LIST_CREDENTIAL_TYPE = "BitstringStatusListCredential"
LIST_TYPE = "BitstringStatusList"
ENTRY_TYPE = "BitstringStatusListEntry"
V2_CONTEXT = "https://www.w3.org/ns/credentials/v2"
_MAX_DECODED = 16 * 1024 * 1024  # refuse gzip bombs


class StatusList:
    """A mutable bitstring; index 0 is the left-most (most significant) bit of byte 0."""

    __slots__ = ("_bits", "size")

    def __init__(self, size: int = MIN_ENTRIES, *, bits: bytes | bytearray | None = None) -> None:
        if bits is not None:
            size = len(bits) * 8
        if not isinstance(size, int) or size < 8 or size % 8:
            raise ValueError("status list size must be a positive multiple of 8")
        self.size = size
        self._bits = bytearray(bits) if bits is not None else bytearray(size // 8)

    def _check(self, index: int) -> int:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.size:
            raise IndexError(f"status index {index!r} outside 0..{self.size - 1}")
        return index

    def get(self, index: int) -> bool:
        self._check(index)
        return bool(self._bits[index >> 3] & (0x80 >> (index & 7)))

    def set(self, index: int, value: bool = True) -> None:
        self._check(index)
        if value:
            self._bits[index >> 3] |= 0x80 >> (index & 7)
        else:
            self._bits[index >> 3] &= ~(0x80 >> (index & 7)) & 0xFF

    def clear(self, index: int) -> None:
        self.set(index, False)

    def __getitem__(self, index: int) -> bool:
        return self.get(index)

    def __len__(self) -> int:
        return self.size

    def encode(self) -> str:
        """``encodedList``: multibase base64url (no padding, prefix 'u') of GZIP(bitstring)."""
        packed = gzip.compress(bytes(self._bits), mtime=0)
        return "u" + base64.urlsafe_b64encode(packed).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, encoded: str) -> StatusList:
        """Parse an ``encodedList``; ``MalformedError`` on anything else."""
        if not isinstance(encoded, str) or not encoded:
            raise MalformedError("encodedList must be a non-empty string")
        text = encoded[1:] if encoded[0] == "u" else encoded  # tolerate the pre-multibase form
        try:
            packed = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            bits = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(packed, _MAX_DECODED + 1)
        except (ValueError, zlib.error) as exc:
            raise MalformedError(f"encodedList is not base64url GZIP: {exc}") from exc
        if not bits or len(bits) > _MAX_DECODED:
            raise MalformedError("encodedList decodes to an empty or oversized bitstring")
        return cls(bits=bits)


def status_entry(url: str, index: int, *, purpose: str = "revocation") -> dict[str, Any]:
    """A ``BitstringStatusListEntry`` to embed as a credential's ``credentialStatus``."""
    if purpose not in PURPOSES:
        raise ValueError(f"statusPurpose must be one of {PURPOSES}")
    if not isinstance(index, int) or index < 0:
        raise ValueError("status index must be a non-negative int")
    return {
        "id": f"{url}#{index}",
        "type": ENTRY_TYPE,
        "statusPurpose": purpose,
        "statusListIndex": str(index),
        "statusListCredential": url,
    }


def status_list_document(
    url: str,
    issuer: str,
    *,
    status_list: StatusList | None = None,
    purpose: str = "revocation",
    valid_from: str | None = None,
    valid_until: str | None = None,
) -> dict[str, Any]:
    """The unsigned ``BitstringStatusListCredential`` (VC 2.0) for ``status_list``."""
    if purpose not in PURPOSES:
        raise ValueError(f"statusPurpose must be one of {PURPOSES}")
    if status_list is not None and status_list.size < MIN_ENTRIES:
        log.warning("status list %s has %d entries, below the spec's %d minimum (herd privacy)",
                    url, status_list.size, MIN_ENTRIES)
    doc: dict[str, Any] = {
        "@context": [V2_CONTEXT],
        "id": url,
        "type": ["VerifiableCredential", LIST_CREDENTIAL_TYPE],
        "issuer": issuer,
        "credentialSubject": {
            "id": f"{url}#list",
            "type": LIST_TYPE,
            "statusPurpose": purpose,
            "encodedList": (status_list or StatusList()).encode(),
        },
    }
    if valid_from:
        doc["validFrom"] = valid_from
    if valid_until:
        doc["validUntil"] = valid_until
    return doc


def create_status_list_credential(
    key: Key,
    url: str,
    *,
    status_list: StatusList | None = None,
    purpose: str = "revocation",
    issuer: str | None = None,
    verification_method: str | None = None,
    valid_from: str | None = None,
    valid_until: str | None = None,
    proof_format: str = "eddsa-jcs-2022",
) -> dict[str, Any] | str:
    """Build and sign a status list credential (re-issue after every :meth:`StatusList.set`)."""
    from sdk.identity.credentials import issue_credential

    doc = status_list_document(
        url, issuer or key.did, status_list=status_list, purpose=purpose,
        valid_from=valid_from, valid_until=valid_until,
    )
    return issue_credential(doc, key, proof_format=proof_format, verification_method=verification_method)


@runtime_checkable
class StatusListSource(Protocol):
    """Fetches a status list credential (dict, or VC-JWT string) by URL."""

    def __call__(self, url: str) -> Mapping[str, Any] | str: ...


@dataclass(frozen=True)
class _Cached:
    fetched_at: float
    issuer: str
    purpose: str
    bits: StatusList
    valid_until: datetime | None


class StatusChecker:
    """Checks ``credentialStatus`` entries against verified, cached status lists.

    ``ttl`` seconds bound how stale a cached list may be; :meth:`update` pushes a fresh list
    (e.g. from an MQTT retained message) and :meth:`invalidate` drops one.
    """

    def __init__(
        self,
        source: StatusListSource | Callable[[str], Any] | None = None,
        *,
        resolver: Resolver | None = None,
        ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._source = source
        self._resolver = resolver
        self._ttl = ttl
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def invalidate(self, url: str | None = None) -> None:
        with self._lock:
            if url is None:
                self._cache.clear()
            else:
                self._cache.pop(url, None)

    def update(self, url: str, credential: Mapping[str, Any] | str, *, now: Any = None) -> None:
        """Verify and cache a status list credential received out of band."""
        entry = self._verify_list(url, credential, now=now)
        with self._lock:
            self._cache[url] = entry

    def _verify_list(self, url: str, credential: Mapping[str, Any] | str, *, now: Any) -> _Cached:
        from sdk.identity.credentials import verify_credential

        result = verify_credential(credential, resolver=self._resolver, now=now, check_status=False)
        if not result.verified:
            raise StatusUnavailable(f"status list {url} does not verify: {', '.join(result.errors)}")
        cred = result.credential or {}
        if LIST_CREDENTIAL_TYPE not in result.types or cred.get("id", url) != url:
            raise StatusUnavailable(f"{url} is not a {LIST_CREDENTIAL_TYPE} for that URL")
        subject = cred.get("credentialSubject")
        if not isinstance(subject, Mapping) or subject.get("type") != LIST_TYPE:
            raise StatusUnavailable(f"{url}: credentialSubject is not a {LIST_TYPE}")
        try:
            bits = StatusList.decode(subject.get("encodedList"))
        except MalformedError as exc:
            raise StatusUnavailable(f"{url}: {exc}") from exc
        return _Cached(self._clock(), result.issuer or "", subject.get("statusPurpose", ""),
                       bits, result.expires_at)

    def _list_for(self, url: str, now: datetime) -> _Cached:
        cached = self._cache.get(url)
        if cached is not None and self._clock() - cached.fetched_at < self._ttl and (
            cached.valid_until is None or now <= cached.valid_until
        ):
            return cached
        if self._source is None:
            raise StatusUnavailable(f"no status list source configured to fetch {url}")
        try:
            fetched = self._source(url)
        except IdentityError:
            raise
        except Exception as exc:  # noqa: BLE001 - the source is user code; map its failure
            raise StatusUnavailable(f"fetching status list {url} failed: {exc}") from exc
        if fetched is None:
            raise StatusUnavailable(f"status list {url} not found")
        entry = self._verify_list(url, fetched, now=now)
        with self._lock:
            self._cache[url] = entry
        return entry

    def check(self, credential_status: Any, *, issuer: str | None, now: Any = None) -> None:
        """Return if every entry's bit is clear; raise Revoked / Suspended / StatusUnavailable."""
        entries = credential_status if isinstance(credential_status, list) else [credential_status]
        when = as_now(now)
        for entry in entries:
            if not isinstance(entry, Mapping) or entry.get("type") != ENTRY_TYPE:
                raise MalformedError(f"unsupported credentialStatus entry: {entry!r}"[:200])
            purpose = entry.get("statusPurpose")
            url = entry.get("statusListCredential")
            raw_index = entry.get("statusListIndex")
            if purpose not in PURPOSES or not isinstance(url, str):
                raise MalformedError("credentialStatus needs statusPurpose and statusListCredential")
            try:
                index = int(raw_index)
            except (TypeError, ValueError):
                raise MalformedError(f"bad statusListIndex {raw_index!r}") from None
            if str(index) != str(raw_index).strip() or index < 0:
                raise MalformedError(f"bad statusListIndex {raw_index!r}")
            listed = self._list_for(url, when)
            if listed.purpose != purpose:
                raise StatusUnavailable(f"{url} is a {listed.purpose} list, entry wants {purpose}")
            if issuer is not None and listed.issuer != issuer:
                raise StatusUnavailable(f"{url} is issued by {listed.issuer}, not {issuer}")
            if index >= listed.bits.size:
                raise MalformedError(f"statusListIndex {index} beyond list size {listed.bits.size}")
            if listed.bits.get(index):
                if purpose == "revocation":
                    raise Revoked(f"revoked ({url} index {index})")
                raise Suspended(f"suspended ({url} index {index})")


def as_status_checker(status: Any, resolver: Resolver | None) -> StatusChecker | None:
    """Normalize a ``status=`` argument: a checker, a source callable, a ``{url: cred}`` dict."""
    if status is None or isinstance(status, StatusChecker):
        return status
    key = id(status)
    with _WRAP_LOCK:
        hit = _WRAPPED.get(key)
        if hit is not None and hit[0] is status and hit[1] is resolver:
            return hit[2]
        if isinstance(status, Mapping):
            source: Callable[[str], Any] = status.get
        elif callable(status):
            source = status
        else:
            raise TypeError("status must be a StatusChecker, a callable url -> credential, or a dict")
        checker = StatusChecker(source, resolver=resolver)
        if len(_WRAPPED) > 64:
            _WRAPPED.clear()
        _WRAPPED[key] = (status, resolver, checker)
        return checker


_WRAPPED: dict[int, tuple[Any, Any, StatusChecker]] = {}
_WRAP_LOCK = threading.Lock()

__all__ = [
    "MIN_ENTRIES",
    "StatusList",
    "StatusListSource",
    "StatusChecker",
    "status_entry",
    "status_list_document",
    "create_status_list_credential",
    "as_status_checker",
]
