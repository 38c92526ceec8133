"""In-memory device registry: who is known, online, admitted; indexed by kind, group, tag and capability.

One :class:`DeviceRecord` per device holds everything the coordinator knows about it: the
persisted claims and state, and (while admitted) its live :class:`Session` (credential, expiry,
what the config pump has sent). Devices appear on first authentication (capabilities and groups
from their DeviceCredential), add capabilities and attributes by announcement, and expire when
their heartbeat TTL lapses or their credential does. A revoked record stays revoked: its revoked
credentials are remembered and never admitted again.

Fleet-wide questions are answered from indexes kept up to date on every change, never by a scan:
devices per state (:meth:`Registry.counts`), heartbeat deadlines (a heap, lazily invalidated:
:meth:`Registry.expired` pops only what is due), records per status-list URL
(:meth:`Registry.with_status_list`) and the DIDs changed since the status snapshot was last
rendered (:meth:`Registry.drain_changed`).

Operators add *tags* (kept in the store's ``tags`` table); rules see them as ``device.tags`` and a
rule's ``group_prefix`` matches a credential group or a tag. Devices report *properties* (a small
JSON object, kept in the ``properties`` table) that fleet queries can filter on.
"""

from __future__ import annotations

import asyncio
import heapq
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from sdk.coord import protocol

ONLINE = "online"
OFFLINE = "offline"
EXPIRED = "expired"
REVOKED = "revoked"


#: the parts of a verified credential a session keeps (decisions after admission need no more:
#: expiry, renewal period and name, types); proof, context and claims are dropped once verified
_KEPT = ("id", "type", "issuer", "validFrom", "validUntil", "expirationDate")


def compact_credential(credential: Mapping[str, Any]) -> dict[str, Any]:
    """What a session keeps of a verified ``credential``: :data:`_KEPT` and the subject's name."""
    out = {k: v for k in _KEPT if (v := credential.get(k)) is not None}
    if isinstance(out.get("type"), list):
        out["type"] = [_shared(t) for t in out["type"]]
    for key in ("issuer", "validFrom", "validUntil", "expirationDate"):    # a fleet issued together shares them
        if key in out:
            out[key] = _shared(out[key])
    subject = credential.get("credentialSubject")
    name = subject.get("name") if isinstance(subject, dict) else None
    if isinstance(name, str):
        out["credentialSubject"] = {"name": name}
    return out


@dataclass(slots=True)
class Session:
    """One admission of a device: ends when the device goes offline, expires, is revoked or
    re-authenticates (a newer session replaces it). Only :func:`compact_credential` of the
    credential is kept."""

    id: str
    credential: dict[str, Any]
    fingerprint: str                     # identifies the credential (see ``auth.fingerprint``)
    valid_until: float | None = None     # the credential's validUntil (epoch seconds)
    sent: int | None = None              # newest config version pushed; None = pump paused

    def __post_init__(self) -> None:
        self.credential = compact_credential(self.credential)

    def expired(self, now: float | None = None) -> bool:
        """True once the credential behind this session is past its validUntil."""
        return self.valid_until is not None and (time.time() if now is None else now) >= self.valid_until


@dataclass(slots=True)
class DeviceRecord:
    """One device as the coordinator knows it (slotted; kinds, group and capability sets shared
    between records through :func:`shared_names`)."""

    did: str
    kind: str = "device"
    name: str = ""
    groups: frozenset[str] = frozenset()
    capabilities: frozenset[str] = frozenset()
    attributes: dict[str, Any] = field(default_factory=dict)
    credential_id: str | None = None
    issuer: str | None = None
    state: str = OFFLINE
    last_seen: float = 0.0          # wall clock (time.time())
    first_seen: float = 0.0
    session: Session | None = None
    heartbeat_ttl: float = 30.0
    announced_capabilities: frozenset[str] = frozenset()
    status: tuple[dict[str, Any], ...] = ()               # credentialStatus entries of its credential
    fingerprint: str | None = None                         # of the credential it was last admitted with
    revoked_credentials: frozenset[str] = frozenset()      # fingerprints, never admitted again
    tags: frozenset[str] = frozenset()                     # operator-assigned (store's tags table)
    valid_until: float | None = None                       # of the credential it was last admitted with
    properties: dict[str, Any] = field(default_factory=dict, compare=False)   # reported (properties table)
    properties_at: float = field(default=0.0, compare=False)
    #: the latest resumption ticket handed to it: (digest, wall-clock expiry), any instance honours it
    ticket: tuple[str, float] | None = field(default=None, compare=False)
    # live, not persisted
    token: str = field(default="", repr=False, compare=False)   # topic id
    pump_lock: asyncio.Lock | None = field(default=None, repr=False, compare=False)
    pumps: int = field(default=0, repr=False, compare=False)    # pumps holding or awaiting pump_lock
    notified_at: float = field(default=0.0, repr=False, compare=False)
    persisted: str | None = field(default=None, repr=False, compare=False)    # digest of the last save

    def __post_init__(self) -> None:
        if not self.token:
            self.token = protocol.token(self.did)
        self.kind = _shared(self.kind)
        self.groups = shared_names(self.groups)
        self.capabilities = shared_names(self.capabilities)
        self.announced_capabilities = shared_names(self.announced_capabilities)
        self.tags = shared_names(self.tags)

    @property
    def lock(self) -> asyncio.Lock:
        """The lock of this device's config pump (made on first use)."""
        if self.pump_lock is None:
            self.pump_lock = asyncio.Lock()
        return self.pump_lock

    def take_lock(self) -> asyncio.Lock:
        """:attr:`lock`, counted as held or awaited by one more pump until its :meth:`pump_done`,
        which drops the lock when no pump is left (a fan-out leaves no lock per device behind)."""
        self.pumps += 1
        return self.lock

    def pump_done(self) -> None:
        """A pump that took :meth:`take_lock` finished (released it or gave up waiting)."""
        self.pumps -= 1
        if self.pumps <= 0:
            self.pumps = 0
            self.pump_lock = None

    @property
    def admitted(self) -> bool:
        """An admitted device may send events and receive configs live."""
        return self.state == ONLINE and self.session is not None

    def view(self) -> dict[str, Any]:
        """The dict that rules see as ``sender.*`` / ``device.*``."""
        return {
            "did": self.did,
            "kind": self.kind,
            "name": self.name,
            "groups": sorted(self.groups),
            "tags": sorted(self.tags),
            "capabilities": sorted(self.capabilities | self.announced_capabilities),
            "attributes": dict(self.attributes),
        }

    def to_row(self) -> dict[str, Any]:
        """A JSON-able summary (CLI, status, store)."""
        return {**self.view(), "credential_id": self.credential_id, "issuer": self.issuer,
                "state": self.state, "last_seen": self.last_seen, "first_seen": self.first_seen,
                "heartbeat_ttl": self.heartbeat_ttl,
                "credential_capabilities": sorted(self.capabilities),
                "announced_capabilities": sorted(self.announced_capabilities),
                "status": [dict(e) for e in self.status], "fingerprint": self.fingerprint,
                "revoked_credentials": sorted(self.revoked_credentials), "valid_until": self.valid_until,
                "ticket": None if self.ticket is None else {"digest": self.ticket[0], "expires": self.ticket[1]}}

    @classmethod
    def from_row(cls, row: Mapping[str, Any], *, heartbeat_ttl: float = 30.0) -> DeviceRecord:
        """Restore a persisted record (a device is never online before it re-authenticates)."""
        caps = row.get("credential_capabilities", row.get("capabilities", ()))
        ttl = row.get("heartbeat_ttl", heartbeat_ttl)
        return cls(did=str(row["did"]), kind=str(row.get("kind", "device")), name=str(row.get("name", "")),
                   groups=frozenset(_str_list(row.get("groups"))), capabilities=frozenset(_str_list(caps)),
                   attributes=dict(row.get("attributes") or {}), credential_id=row.get("credential_id"),
                   issuer=row.get("issuer"), state=REVOKED if row.get("state") == REVOKED else OFFLINE,
                   last_seen=float(row.get("last_seen", 0.0)), first_seen=float(row.get("first_seen", 0.0)),
                   heartbeat_ttl=float(ttl) if isinstance(ttl, (int, float)) else heartbeat_ttl,
                   announced_capabilities=frozenset(_str_list(row.get("announced_capabilities"))),
                   status=tuple(e for e in row.get("status") or () if isinstance(e, dict)),
                   fingerprint=row.get("fingerprint"),
                   revoked_credentials=frozenset(_str_list(row.get("revoked_credentials"))),
                   tags=frozenset(_str_list(row.get("tags"))), valid_until=_epoch(row.get("valid_until")),
                   ticket=_ticket(row.get("ticket")))


def _ticket(value: Any) -> tuple[str, float] | None:
    """A persisted ticket ``{digest, expires}``, or None when absent or malformed."""
    if isinstance(value, dict) and isinstance(value.get("digest"), str) \
            and isinstance(value.get("expires"), (int, float)) and not isinstance(value.get("expires"), bool):
        return value["digest"], float(value["expires"])
    return None


class Registry:
    """Known devices with kind, group, tag and capability indexes (implements the rules' DeviceIndex)."""

    def __init__(self) -> None:
        self._devices: dict[str, DeviceRecord] = {}
        self._groups: dict[str, set[str]] = {}
        self._caps: dict[str, set[str]] = {}
        self._kinds: dict[str, set[str]] = {}
        self._tags: dict[str, set[str]] = {}
        self._status_lists: dict[str, set[str]] = {}  # statusListCredential URL -> DIDs
        self._order: list[str] | None = None          # every DID, sorted (rebuilt when one is added)
        self._counts: dict[str, int] = {ONLINE: 0, OFFLINE: 0, EXPIRED: 0, REVOKED: 0}
        # heartbeat deadlines of online devices: (last_seen + heartbeat_ttl, did); at most one live
        # entry per DID (the one equal to _due[did]); a popped entry that is not yet due is re-pushed
        self._heap: list[tuple[float, str]] = []
        self._due: dict[str, float] = {}
        self._changed: set[str] = set()

    def __len__(self) -> int:
        return len(self._devices)

    def __contains__(self, did: object) -> bool:
        return did in self._devices

    def __iter__(self) -> Iterator[DeviceRecord]:
        return iter(list(self._devices.values()))

    def get(self, did: str) -> DeviceRecord | None:
        """The record for ``did``, or None."""
        return self._devices.get(did)

    def _unindex(self, rec: DeviceRecord) -> None:
        for index, names in ((self._groups, rec.groups), (self._tags, rec.tags), (self._kinds, (rec.kind,)),
                             (self._caps, rec.capabilities | rec.announced_capabilities),
                             (self._status_lists, _list_urls(rec))):
            for name in names:
                members = index.get(name)
                if members is not None:
                    members.discard(rec.did)
                    if not members:
                        del index[name]

    def _index(self, rec: DeviceRecord) -> None:
        for index, names in ((self._groups, rec.groups), (self._tags, rec.tags), (self._kinds, (rec.kind,)),
                             (self._caps, rec.capabilities | rec.announced_capabilities),
                             (self._status_lists, _list_urls(rec))):
            for name in names:
                index.setdefault(name, set()).add(rec.did)
        self._changed.add(rec.did)

    def _moved(self, rec: DeviceRecord, old: str | None) -> None:
        """Keep the state counters and the heartbeat heap in step with ``rec.state``."""
        if old is not None:
            self._counts[old] = self._counts.get(old, 0) - 1
        self._counts[rec.state] = self._counts.get(rec.state, 0) + 1
        if rec.state == ONLINE:
            self._watch(rec)
        self._changed.add(rec.did)

    def _watch(self, rec: DeviceRecord) -> None:
        """Make sure an entry no later than ``rec``'s heartbeat deadline is in the heap."""
        deadline = rec.last_seen + rec.heartbeat_ttl
        queued = self._due.get(rec.did)
        if queued is None or deadline < queued:
            self._due[rec.did] = deadline
            heapq.heappush(self._heap, (deadline, rec.did))

    def put(self, rec: DeviceRecord) -> DeviceRecord:
        """Insert or replace a record (used when loading from the store)."""
        old = self._devices.get(rec.did)
        if old is not None:
            self._unindex(old)
        else:
            self._order = None
        self._devices[rec.did] = rec
        self._index(rec)
        self._moved(rec, None if old is None else old.state)
        return rec

    def admission(self, did: str, subject: Mapping[str, Any], *, credential_id: str | None = None,
                  issuer: str | None = None, session: Session | None = None, heartbeat_ttl: float = 30.0,
                  status: Iterable[Mapping[str, Any]] = (), capabilities: Iterable[str] | None = None,
                  attributes: Mapping[str, Any] | None = None, now: float | None = None) -> DeviceRecord:
        """The record ``did`` would have once admitted, built without touching the registry (commit it
        with :meth:`put` once persisted, so a failed admission changes nothing)."""
        now = time.time() if now is None else now
        old = self._devices.get(did)
        rec = DeviceRecord(did=did, first_seen=now) if old is None else DeviceRecord(
            did=did, first_seen=old.first_seen, kind=old.kind, name=old.name, attributes=dict(old.attributes),
            announced_capabilities=old.announced_capabilities, revoked_credentials=old.revoked_credentials,
            pump_lock=old.pump_lock, notified_at=old.notified_at, persisted=old.persisted, token=old.token,
            tags=old.tags, properties=old.properties, properties_at=old.properties_at)
        rec.kind = _shared(str(subject.get("kind") or subject.get("deviceType") or rec.kind))
        rec.name = str(subject.get("name") or rec.name)
        rec.groups = shared_names(_str_list(subject.get("groups")))
        rec.capabilities = shared_names(_str_list(subject.get("capabilities")))
        rec.credential_id, rec.issuer = credential_id, _shared(issuer)
        rec.state, rec.session, rec.last_seen = ONLINE, session, now
        rec.heartbeat_ttl = heartbeat_ttl
        rec.status = tuple({k: v if k == "statusListIndex" else _shared(v) for k, v in e.items()} for e in status)
        rec.fingerprint = session.fingerprint if session is not None else None
        rec.valid_until = session.valid_until if session is not None else None
        if capabilities is not None:
            rec.announced_capabilities = shared_names(_str_list(list(capabilities)))
        if attributes:
            rec.attributes.update(attributes)
        return rec

    def register(self, did: str, subject: dict[str, Any], *, credential_id: str | None = None,
                 issuer: str | None = None, session: Session | None = None,
                 heartbeat_ttl: float = 30.0, now: float | None = None) -> DeviceRecord:
        """Admit ``did`` with the claims of its credential subject (kind, groups, capabilities)."""
        return self.put(self.admission(did, subject, credential_id=credential_id, issuer=issuer,
                                       session=session, heartbeat_ttl=heartbeat_ttl, now=now))

    def announce(self, did: str, *, capabilities: Iterable[str] | None = None,
                 attributes: dict[str, Any] | None = None) -> DeviceRecord | None:
        """Merge announced capabilities/attributes into an admitted device's record."""
        rec = self._devices.get(did)
        if rec is None:
            return None
        self._unindex(rec)
        if capabilities is not None:
            rec.announced_capabilities = shared_names(_str_list(list(capabilities)))
        if attributes:
            rec.attributes.update(attributes)
        self._index(rec)
        return rec

    def set_tags(self, did: str, tags: Iterable[str]) -> DeviceRecord | None:
        """Replace ``did``'s operator tags (indexes follow)."""
        rec = self._devices.get(did)
        if rec is None:
            return None
        self._unindex(rec)
        rec.tags = shared_names(tags)
        self._index(rec)
        return rec

    def touch(self, did: str, now: float | None = None) -> None:
        """Record a sign of life (heartbeat or any message)."""
        rec = self._devices.get(did)
        if rec is not None:
            rec.last_seen = time.time() if now is None else now
            self._changed.add(did)
            if rec.state == ONLINE:
                self._watch(rec)      # only pushes when the deadline moved earlier (a clock step)

    def set_state(self, did: str, state: str) -> DeviceRecord | None:
        """Move a device to ONLINE/OFFLINE/EXPIRED/REVOKED; leaving ONLINE ends its session.

        REVOKED is final: a revoked record never moves to another state (only a new admission
        with a credential that was not revoked replaces it)."""
        rec = self._devices.get(did)
        if rec is None:
            return None
        if rec.state == REVOKED and state != REVOKED:
            return rec
        old, rec.state = rec.state, state
        if state != ONLINE:
            rec.session = None
        self._moved(rec, old)
        return rec

    def revoke(self, did: str, fingerprints: Iterable[str]) -> DeviceRecord | None:
        """Mark ``did`` revoked and remember the revoked credentials (never admitted again)."""
        rec = self.set_state(did, REVOKED)
        if rec is not None:
            rec.revoked_credentials = rec.revoked_credentials | frozenset(fingerprints)
        return rec

    def expired(self, now: float | None = None) -> list[DeviceRecord]:
        """Online devices whose heartbeat TTL has lapsed (not yet marked).

        Work is proportional to the deadlines that came due, not to the fleet: a due entry whose
        device was seen since is pushed again at its new deadline; entries of devices no longer
        online are dropped."""
        now = time.time() if now is None else now
        out: list[DeviceRecord] = []
        later: list[DeviceRecord] = []
        heap, due = self._heap, self._due
        while heap and heap[0][0] <= now:
            deadline, did = heapq.heappop(heap)
            if due.get(did) != deadline:
                continue                               # superseded by an earlier entry
            del due[did]
            rec = self._devices.get(did)
            if rec is None or rec.state != ONLINE:
                continue
            if now - rec.last_seen > rec.heartbeat_ttl:
                out.append(rec)
            else:
                later.append(rec)
        for rec in later:
            self._watch(rec)
        for rec in out:                                # still online until the caller marks it
            self._watch(rec)
        return out

    def online(self) -> list[DeviceRecord]:
        """Currently admitted devices."""
        return [r for r in self._devices.values() if r.state == ONLINE]

    def counts(self) -> dict[str, int]:
        """Devices per state, kept on every transition (equal to a recount)."""
        return dict(self._counts)

    def with_status_list(self, url: str) -> list[DeviceRecord]:
        """Records whose credential has a ``credentialStatus`` entry on the list at ``url``."""
        return [self._devices[did] for did in self._status_lists.get(url, ())]

    def changed(self, did: str) -> None:
        """Note that ``did``'s status row must be rendered again (a change the registry cannot see)."""
        self._changed.add(did)

    def drain_changed(self) -> set[str]:
        """DIDs changed since the last call (records put, moved, touched, tagged or announced)."""
        out, self._changed = self._changed, set()
        return out

    # -- DeviceIndex for the rules engine
    def view(self, did: str) -> dict[str, Any] | None:
        """Rule view of a device; revoked devices are invisible to rules."""
        rec = self._devices.get(did)
        if rec is None or rec.state == REVOKED:
            return None
        return rec.view()

    def sharing_group(self, did: str, prefix: str) -> Iterable[str]:
        """Devices sharing at least one group or tag (starting with ``prefix``) with ``did``: an
        operator tag counts as a group, so tagging a device moves it without a new credential."""
        rec = self._devices.get(did)
        if rec is None:
            return ()
        out: set[str] = set()
        for g in rec.groups | rec.tags:
            if g.startswith(prefix):
                out |= self.members(g)
        return out

    def members(self, group: str) -> set[str]:
        """Devices in credential group ``group`` or tagged ``group``."""
        return self._groups.get(group, set()) | self._tags.get(group, set())

    def with_kind(self, kind: str) -> set[str]:
        """Devices of ``kind``."""
        return set(self._kinds.get(kind, set()))

    def with_tag(self, tag: str) -> set[str]:
        """Devices tagged ``tag`` by an operator."""
        return set(self._tags.get(tag, set()))

    def dids(self) -> list[str]:
        """Every known DID, sorted (cached until a device is added)."""
        if self._order is None:
            self._order = sorted(self._devices)
        return self._order

    def with_capability(self, capability: str) -> Iterable[str]:
        """Devices holding ``capability`` (from credential or announcement)."""
        return set(self._caps.get(capability, set()))


#: one frozenset object per distinct set of names (a fleet has few: its groups, kinds, capability sets)
_NAME_SETS: dict[frozenset[str], frozenset[str]] = {}
_NO_NAMES: frozenset[str] = frozenset()
_MAX_SHARED = 65_536


def shared_names(names: Iterable[str]) -> frozenset[str]:
    """``frozenset(names)``, the same object for every equal set (strings interned), so 10,000
    records in one group hold one set, not 10,000 copies. Past :data:`_MAX_SHARED` distinct sets
    (names that are unique per device) new sets are not remembered."""
    key = names if isinstance(names, frozenset) else frozenset(names)
    if not key:
        return _NO_NAMES                     # ``frozenset()`` is a new object each time
    hit = _NAME_SETS.get(key)
    if hit is None:
        hit = frozenset(sys.intern(str(n)) for n in key)
        if len(_NAME_SETS) < _MAX_SHARED:
            _NAME_SETS[hit] = hit
    return hit


def _shared(value: Any) -> Any:
    """Short strings interned: only values that repeat across the fleet (kinds, types, issuers,
    status-list URLs and purposes); interning a value unique to one device would only cost."""
    return sys.intern(value) if isinstance(value, str) and len(value) <= 256 else value


def _list_urls(rec: DeviceRecord) -> set[str]:
    return {url for e in rec.status if isinstance(url := e.get("statusListCredential"), str)}


def _epoch(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _str_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [str(v) for v in value]
    return []


__all__ = ["DeviceRecord", "Session", "Registry", "compact_credential", "shared_names", "ONLINE", "OFFLINE",
           "EXPIRED", "REVOKED"]
