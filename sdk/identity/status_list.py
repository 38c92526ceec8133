"""W3C Bitstring Status List v1.0: the bitstring, ordered status list credentials, checking.

A status list credential carries its own order, signed inside it: ``validFrom`` and
``credentialSubject.sequence`` (newer lists compare greater) and a ``validUntil`` before which
the issuer republishes. :class:`StatusListStore` keeps, per list URL, the newest verified list
from a trusted issuer and never goes back; :class:`StatusChecker` checks ``credentialStatus``
entries against a store or any ``url -> credential`` :class:`StatusListSource` and fails closed
on a list that is missing, unverifiable or past its ``validUntil``.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, runtime_checkable

from sdk.identity.datetimes import as_now, as_skew, format_datetime, parse_datetime
from sdk.identity.errors import IdentityError, MalformedError, Revoked, StatusUnavailable, Suspended
from sdk.identity.hazmat.b64 import b64url_decode, b64url_encode
from sdk.identity.keys import Key
from sdk.identity.resolver import Resolver, as_resolver
from sdk.identity.trust import TrustPolicy
from sdk.identity.vc import DEFAULT_SKEW, check_credential, issue_credential

log = logging.getLogger(__name__)

MIN_ENTRIES = 131072  # 16 KiB: the spec's minimum, for herd privacy
PURPOSES = ("revocation", "suspension")
LIST_CREDENTIAL_TYPE = "BitstringStatusListCredential"
LIST_TYPE = "BitstringStatusList"
ENTRY_TYPE = "BitstringStatusListEntry"
V2_CONTEXT = "https://www.w3.org/ns/credentials/v2"
_MAX_DECODED = 16 * 1024 * 1024  # refuse gzip bombs
_MAX_ENCODED = 4 * 1024 * 1024  # characters of encodedList read at most
#: How long a new status list credential is valid unless told otherwise.
DEFAULT_TTL = timedelta(hours=24)
#: How long before ``validUntil`` an issuer should republish.
DEFAULT_REFRESH_MARGIN = timedelta(hours=1)


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
        return "u" + b64url_encode(packed).decode("ascii")

    @classmethod
    def decode(cls, encoded: str) -> StatusList:
        """Parse an ``encodedList`` (multibase 'u' + canonical base64url of GZIP); else ``MalformedError``."""
        if not isinstance(encoded, str) or not encoded.startswith("u"):
            raise MalformedError("encodedList must be a multibase base64url string (prefix 'u')")
        try:
            packed = b64url_decode(encoded[1:], max_len=_MAX_ENCODED)
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



def _as_datetime_text(value: str | datetime) -> str:
    if isinstance(value, datetime):
        return format_datetime(value)
    parse_datetime(value)  # MalformedError on junk
    return value


def _precise(dt: datetime) -> str:
    """A dateTime with microseconds when it has any (lists issued within a second stay ordered)."""
    if not dt.microsecond:
        return format_datetime(dt)
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_seq_lock = threading.Lock()
_last_sequence = 0


def next_sequence() -> int:
    """A process-wide increasing sequence: microseconds since the epoch, bumped past the last one."""
    global _last_sequence
    with _seq_lock:
        _last_sequence = max(time.time_ns() // 1000, _last_sequence + 1)
        return _last_sequence


def status_list_document(
    url: str,
    issuer: str,
    *,
    status_list: StatusList | None = None,
    purpose: str = "revocation",
    valid_from: str | datetime | None = None,
    valid_until: str | datetime | None = None,
    sequence: int | None = None,
) -> dict[str, Any]:
    """The unsigned ``BitstringStatusListCredential`` (VC 2.0) for ``status_list``."""
    if purpose not in PURPOSES:
        raise ValueError(f"statusPurpose must be one of {PURPOSES}")
    if sequence is not None and (not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0):
        raise ValueError("sequence must be a non-negative int")
    if status_list is not None and status_list.size < MIN_ENTRIES:
        log.warning("status list %s has %d entries, below the spec's %d minimum (herd privacy)",
                    url, status_list.size, MIN_ENTRIES)
    subject: dict[str, Any] = {
        "id": f"{url}#list",
        "type": LIST_TYPE,
        "statusPurpose": purpose,
        "encodedList": (status_list or StatusList()).encode(),
    }
    if sequence is not None:
        subject["sequence"] = sequence
    doc: dict[str, Any] = {
        "@context": [V2_CONTEXT],
        "id": url,
        "type": ["VerifiableCredential", LIST_CREDENTIAL_TYPE],
        "issuer": issuer,
        "credentialSubject": subject,
    }
    if valid_from:
        doc["validFrom"] = _as_datetime_text(valid_from)
    if valid_until:
        doc["validUntil"] = _as_datetime_text(valid_until)
    return doc


def create_status_list_credential(
    key: Key,
    url: str,
    *,
    status_list: StatusList | None = None,
    purpose: str = "revocation",
    issuer: str | None = None,
    verification_method: str | None = None,
    valid_from: str | datetime | None = None,
    valid_until: str | datetime | None = None,
    ttl: timedelta | float = DEFAULT_TTL,
    sequence: int | None = None,
    now: datetime | float | None = None,
    proof_format: str = "eddsa-jcs-2022",
) -> dict[str, Any] | str:
    """Build and sign a status list credential (re-issue after every :meth:`StatusList.set`).

    Ordering is signed inside it: ``validFrom`` (default ``now``, to the microsecond; a VC-JWT
    keeps whole seconds), ``validUntil`` (default
    ``validFrom + ttl``; republish before then) and ``credentialSubject.sequence`` (default
    :func:`next_sequence`; pass a persisted counter to order lists across restarts).
    """
    start = parse_datetime(_as_datetime_text(valid_from)) if valid_from else as_now(now)
    lifetime = as_skew(ttl)
    if lifetime <= timedelta(0):
        raise ValueError("ttl must be positive")
    end = valid_until if valid_until else _precise(start + lifetime)
    doc = status_list_document(
        url, issuer or key.did, status_list=status_list, purpose=purpose,
        valid_from=valid_from if valid_from else _precise(start), valid_until=end,
        sequence=next_sequence() if sequence is None else sequence,
    )
    return issue_credential(doc, key, proof_format=proof_format, verification_method=verification_method,
                            created=format_datetime(start))


def needs_refresh(credential: Mapping[str, Any] | str, *, now: datetime | float | None = None,
                  margin: timedelta | float = DEFAULT_REFRESH_MARGIN) -> bool:
    """For an issuer holding its own signed list: True when ``validUntil - margin`` has passed.

    Reads the issuer's own credential without verifying it; a list without a readable
    ``validUntil`` always needs refreshing.
    """
    when = as_now(now)
    until: Any = None
    if isinstance(credential, Mapping):
        until = credential.get("validUntil")
    elif isinstance(credential, str):
        from sdk.identity.jwt_vc import unverified_claims

        exp = unverified_claims(credential).get("exp")
        if isinstance(exp, int) and not isinstance(exp, bool):
            return when + as_skew(margin) >= datetime.fromtimestamp(exp, when.tzinfo)
    try:
        return when + as_skew(margin) >= parse_datetime(until)
    except MalformedError:
        return True


def status_list_order(credential: Any) -> tuple[datetime, int] | None:
    """The (validFrom, sequence) a status list credential claims, read WITHOUT verifying it.

    For transports that pre-order retained state cheaply; None when it carries no readable
    order. Acceptance is still :meth:`StatusListStore.offer`'s decision, after verification.
    """
    doc: Any = credential
    try:
        if isinstance(credential, str):
            from sdk.identity.jwt_vc import claims_to_credential, unverified_claims

            doc = claims_to_credential(unverified_claims(credential))
        if not isinstance(doc, Mapping):
            return None
        subject = doc.get("credentialSubject")
        sequence = subject.get("sequence", 0) if isinstance(subject, Mapping) else 0
        if not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
            return None
        return parse_datetime(doc.get("validFrom")), sequence
    except (IdentityError, ValueError, TypeError):
        return None


@runtime_checkable
class StatusListSource(Protocol):
    """Fetches a status list credential (dict, or VC-JWT string) by URL."""

    def __call__(self, url: str) -> Mapping[str, Any] | str | None: ...


class StatusListRejected(StatusUnavailable):
    """A status list credential was not accepted; ``problem`` says why.

    ``problem``: ``invalid`` (proof, shape or encoding), ``untrusted`` (issuer not in the
    trust policy), ``unordered`` (no validFrom/validUntil), ``not_yet_valid``, ``expired``,
    ``stale`` (older than the list already held), ``conflict`` (same order, other content),
    ``issuer_changed`` (the URL belongs to another issuer), ``full`` (store at capacity).
    The ``reason`` stays ``status_unavailable`` so verification results read the same.
    """

    def __init__(self, message: str, *, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


class StatusListExpired(StatusListRejected):
    """The status list is past its ``validUntil``: statuses cannot be known, so checks fail closed."""

    def __init__(self, message: str) -> None:
        super().__init__(message, problem="expired")


@dataclass(frozen=True)
class VerifiedStatusList:
    """A status list credential whose proof verified, with its decoded bits and order."""

    url: str
    issuer: str
    purpose: str
    bits: StatusList
    valid_from: datetime | None
    valid_until: datetime | None
    sequence: int
    credential: Mapping[str, Any] | str

    @property
    def order(self) -> tuple[datetime, int] | None:
        """What "newer" compares: (validFrom, sequence); None for a list without validFrom."""
        return None if self.valid_from is None else (self.valid_from, self.sequence)

    def expired(self, now: datetime, skew: timedelta = DEFAULT_SKEW) -> bool:
        return self.valid_until is not None and now - skew > self.valid_until


def verify_status_list(
    credential: Mapping[str, Any] | str,
    *,
    url: str | None = None,
    resolver: Resolver | None = None,
    now: datetime | float | None = None,
    skew: timedelta | float = DEFAULT_SKEW,
) -> VerifiedStatusList:
    """Verify a status list credential's proof and shape; raise :class:`StatusListRejected`.

    The issuer is not checked here (a :class:`StatusChecker` binds it to the credential's issuer,
    a :class:`StatusListStore` to its trust policy).
    """
    when, tol = as_now(now), as_skew(skew)
    result = check_credential(credential, resolver=as_resolver(resolver), now=when, skew=tol,
                              trust=TrustPolicy.ANY, status=None, check_status=False)
    label = url or "status list"
    if "expired" in result.errors:
        raise StatusListExpired(f"{label} expired at {result.expires_at}")
    if "not_yet_valid" in result.errors:
        raise StatusListRejected(f"{label} is not valid before {result.issued_at}", problem="not_yet_valid")
    if not result.verified:
        raise StatusListRejected(f"{label} does not verify: {', '.join(result.errors)}", problem="invalid")
    cred = result.credential or {}
    cred_id = cred.get("id")
    if LIST_CREDENTIAL_TYPE not in result.types or not isinstance(cred_id, str) or (
            url is not None and cred_id != url):
        raise StatusListRejected(f"{label} is not a {LIST_CREDENTIAL_TYPE} for that URL", problem="invalid")
    subject = cred.get("credentialSubject")
    if not isinstance(subject, Mapping) or subject.get("type") != LIST_TYPE:
        raise StatusListRejected(f"{label}: credentialSubject is not a {LIST_TYPE}", problem="invalid")
    purpose = subject.get("statusPurpose")
    sequence = subject.get("sequence", 0)
    if purpose not in PURPOSES or not isinstance(sequence, int) or isinstance(sequence, bool) or sequence < 0:
        raise StatusListRejected(f"{label}: bad statusPurpose or sequence", problem="invalid")
    try:
        bits = StatusList.decode(subject.get("encodedList"))  # type: ignore[arg-type]
    except MalformedError as exc:
        raise StatusListRejected(f"{label}: {exc}", problem="invalid") from exc
    return VerifiedStatusList(cred_id, result.issuer or "", purpose, bits, result.issued_at,
                              result.expires_at, sequence, credential)


Listener = Callable[[str, Any], Any]


class StatusListStore:
    """The newest verified status list per URL from trusted issuers; it never goes back.

    :meth:`offer` accepts a list only if its proof verifies, its issuer is trusted (any issuer
    in ``trust`` may publish its own lists), it carries ``validFrom`` and ``validUntil``, is
    currently valid, and is strictly newer (``validFrom``, then ``credentialSubject.sequence``)
    than the list held for that URL; re-offering the identical list is a no-op. The store is a
    :class:`StatusListSource` (``store(url)``) and a :class:`VerifiedListSource` (``verified(url)``),
    which :class:`StatusChecker` reads live.
    """

    def __init__(
        self,
        trust: TrustPolicy,
        *,
        resolver: Resolver | None = None,
        skew: timedelta | float = DEFAULT_SKEW,
        max_lists: int = 1024,
    ) -> None:
        if not isinstance(trust, TrustPolicy):
            raise TypeError("trust must be a TrustPolicy (TrustPolicy.ANY accepts any issuer)")
        self.trust = trust
        self._resolver = resolver
        self._skew = as_skew(skew)
        self._max = max_lists
        self._lists: dict[str, VerifiedStatusList] = {}
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    # -- reading ------------------------------------------------------------------------------

    def __call__(self, url: str) -> Mapping[str, Any] | str | None:
        entry = self._lists.get(url)
        return entry.credential if entry is not None else None

    def __contains__(self, url: object) -> bool:
        return url in self._lists

    def __len__(self) -> int:
        return len(self._lists)

    def verified(self, url: str) -> VerifiedStatusList | None:
        """The verified list held for ``url`` (possibly expired by now), or None."""
        return self._lists.get(url)

    def urls(self) -> list[str]:
        return list(self._lists)

    def needs_refresh(self, now: datetime | float | None = None,
                      margin: timedelta | float = DEFAULT_REFRESH_MARGIN, *,
                      issuer: str | None = None) -> list[str]:
        """URLs (of ``issuer``, or all) whose list reaches ``validUntil`` within ``margin``."""
        when, lead = as_now(now), as_skew(margin)
        return [url for url, e in list(self._lists.items())
                if (issuer is None or e.issuer == issuer)
                and (e.valid_until is None or when + lead >= e.valid_until)]

    # -- changing -----------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(url, credential)`` after a newer list is accepted."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        try:
            self._listeners.remove(listener)
        except ValueError:
            pass

    def offer(self, credential: Mapping[str, Any] | str, *, now: datetime | float | None = None) -> bool:
        """Accept ``credential`` if it is a newer valid list; True if the store changed. Never raises."""
        try:
            return self.add(credential, now=now)
        except StatusListRejected as exc:
            level = logging.INFO if exc.problem in ("stale",) else logging.WARNING
            log.log(level, "status list refused (%s): %s", exc.problem, exc)
            return False
        except TypeError as exc:
            log.warning("status list refused (invalid): %s", exc)
            return False

    def add(self, credential: Mapping[str, Any] | str, *, now: datetime | float | None = None) -> bool:
        """Like :meth:`offer` but raise :class:`StatusListRejected`; False for the identical list."""
        when = as_now(now)
        entry = verify_status_list(credential, resolver=self._resolver, now=when, skew=self._skew)
        if not self.trust.trusts_issuer(entry.issuer):
            raise StatusListRejected(f"{entry.url}: issuer {entry.issuer} is not trusted",
                                     problem="untrusted")
        if entry.order is None or entry.valid_until is None:
            raise StatusListRejected(f"{entry.url} has no validFrom/validUntil to order it",
                                     problem="unordered")
        with self._lock:
            held = self._lists.get(entry.url)
            if held is None and len(self._lists) >= self._max:
                raise StatusListRejected(f"{entry.url}: store holds {self._max} lists", problem="full")
            if held is not None:
                if held.issuer != entry.issuer:
                    raise StatusListRejected(f"{entry.url} belongs to {held.issuer}, not {entry.issuer}",
                                             problem="issuer_changed")
                assert held.order is not None
                if entry.order == held.order:
                    if _same(entry.credential, held.credential):
                        return False
                    raise StatusListRejected(f"{entry.url}: a different list with the same order",
                                             problem="conflict")
                if entry.order < held.order:
                    raise StatusListRejected(
                        f"{entry.url}: list of {format_datetime(entry.order[0])} #{entry.order[1]} is older "
                        f"than the one held ({format_datetime(held.order[0])} #{held.order[1]})",
                        problem="stale")
            self._lists[entry.url] = entry
        log.info("status list %s accepted (validFrom %s, sequence %d, validUntil %s)", entry.url,
                 entry.valid_from, entry.sequence, entry.valid_until)
        for listener in list(self._listeners):
            try:
                listener(entry.url, entry.credential)
            except Exception:
                log.exception("status list listener failed for %s", entry.url)
        return True


def _same(a: Any, b: Any) -> bool:
    return a is b or a == b


@runtime_checkable
class VerifiedListSource(Protocol):
    """A source that hands out lists it already verified and ordered (a :class:`StatusListStore`)."""

    def verified(self, url: str) -> VerifiedStatusList | None: ...


@dataclass(frozen=True)
class _Cached:
    fetched_at: float
    entry: VerifiedStatusList


class StatusChecker:
    """Checks ``credentialStatus`` entries against verified status lists; fails closed.

    With a :class:`VerifiedListSource` (a :class:`StatusListStore`, or anything with its
    ``verified(url)``) as ``source`` it reads the current list on every
    check (a newer list takes effect at once). With any other source it verifies what the
    source returns and caches it for ``ttl`` seconds, never replacing a list by an older one;
    :meth:`update` pushes a list and :meth:`invalidate` drops one. A list past its
    ``validUntil`` fails every check with :class:`StatusListExpired` (``status_unavailable``).
    """

    def __init__(
        self,
        source: StatusListSource | Callable[[str], Any] | None = None,
        *,
        resolver: Resolver | None = None,
        ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        skew: timedelta | float = DEFAULT_SKEW,
    ) -> None:
        self._source = source
        self._store = source if isinstance(source, VerifiedListSource) else None
        self._resolver = resolver
        self._ttl = ttl
        self._clock = clock
        self._skew = as_skew(skew)
        self._cache: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def invalidate(self, url: str | None = None) -> None:
        with self._lock:
            if url is None:
                self._cache.clear()
            else:
                self._cache.pop(url, None)

    def update(self, url: str, credential: Mapping[str, Any] | str, *, now: Any = None) -> None:
        """Verify and cache a status list credential received out of band (never an older one)."""
        entry = verify_status_list(credential, url=url, resolver=self._resolver, now=now, skew=self._skew)
        with self._lock:
            held = self._cache.get(url)
            if held is not None and _older(entry, held.entry):
                raise StatusListRejected(f"{url}: refusing a list older than the one held", problem="stale")
            self._cache[url] = _Cached(self._clock(), entry)

    def _list_for(self, url: str, now: datetime) -> VerifiedStatusList:
        if self._store is not None:
            held = self._store.verified(url)
            if held is None:
                raise StatusUnavailable(f"no status list {url} received yet")
            return held
        cached = self._cache.get(url)
        if cached is not None and self._clock() - cached.fetched_at < self._ttl and not cached.entry.expired(
                now, self._skew):
            return cached.entry
        if self._source is None:
            raise StatusUnavailable(f"no status list source configured to fetch {url}")
        try:
            fetched = self._source(url)
        except IdentityError:
            raise
        except Exception as exc:
            raise StatusUnavailable(f"fetching status list {url} failed: {exc}") from exc
        if fetched is None:
            raise StatusUnavailable(f"status list {url} not found")
        entry = verify_status_list(fetched, url=url, resolver=self._resolver, now=now, skew=self._skew)
        with self._lock:
            held = self._cache.get(url)
            if held is not None and _older(entry, held.entry):
                log.warning("status list %s: source returned an older list; keeping the newer one", url)
                entry = held.entry
            self._cache[url] = _Cached(self._clock(), entry)
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
            if not isinstance(purpose, str) or purpose not in PURPOSES or not isinstance(url, str):
                raise MalformedError("credentialStatus needs statusPurpose and statusListCredential")
            index = _index(raw_index)
            listed = self._list_for(url, when)
            if listed.expired(when, self._skew):
                raise StatusListExpired(f"status list {url} expired at {listed.valid_until}; "
                                        "statuses unknown")
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


def _index(raw: Any) -> int:
    """``statusListIndex``: a decimal string without leading zeros (or an int), bounded."""
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < _MAX_INDEX:
        return raw
    if isinstance(raw, str):
        text = raw.strip()
        if 0 < len(text) <= 12 and text.isascii() and text.isdigit() and (text == "0" or text[0] != "0"):
            return int(text)
    raise MalformedError(f"bad statusListIndex {raw!r}"[:120])


_MAX_INDEX = 10**12


def _older(new: VerifiedStatusList, held: VerifiedStatusList) -> bool:
    return new.order is not None and held.order is not None and new.order < held.order


def as_status_checker(status: Any, resolver: Resolver | None) -> StatusChecker | None:
    """Normalize a ``status=`` argument: a checker, a store, a source callable, a ``{url: cred}`` dict."""
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
            raise TypeError("status must be a StatusChecker, a StatusListStore, "
                            "a callable url -> credential, or a dict")
        checker = StatusChecker(source, resolver=resolver)
        if len(_WRAPPED) > 64:
            _WRAPPED.clear()
        _WRAPPED[key] = (status, resolver, checker)
        return checker


_WRAPPED: dict[int, tuple[Any, Any, StatusChecker]] = {}
_WRAP_LOCK = threading.Lock()

__all__ = [
    "MIN_ENTRIES",
    "DEFAULT_TTL",
    "DEFAULT_REFRESH_MARGIN",
    "StatusList",
    "StatusListSource",
    "StatusListStore",
    "StatusListRejected",
    "StatusListExpired",
    "StatusChecker",
    "VerifiedStatusList",
    "VerifiedListSource",
    "verify_status_list",
    "needs_refresh",
    "next_sequence",
    "status_list_order",
    "status_entry",
    "status_list_document",
    "create_status_list_credential",
    "as_status_checker",
]
