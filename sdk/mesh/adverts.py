"""Node advertisements: what a node says about itself, and the router's table of them.

A node publishes an advertisement every few seconds (retained) and a death notice when it
stops (also as its MQTT will). Each carries the node's boot ``epoch`` and a ``seq`` number that
rises with every advertisement, so the table ignores stale or out-of-order copies (a retained
message delivered late, a replay by the broker) and notices a node that restarted. A node id
belongs to the DID that holds it while that node is live: another DID's advert for it is
ignored whatever its epoch (it may claim the id only after a death notice or staleness).

Besides load, an advert may carry the node's hardware, its measured :class:`Capacity`
(``sdk.mesh.capacity``) and a :class:`PrefixSummary` of the prompt prefixes it holds
(``sdk.mesh.prefixes``); each is validated strictly (types, finite bounded numbers, sizes) and a
malformed one rejects the whole advert.

An advert also lists the request ``features`` the node honours (:data:`FEATURES`:
``json_schema`` and ``json_object`` constrained output, ``tools``), found by
:func:`engine_features` (the grammar library imported and a grammar compiled for the engine's
tokenizer). A node that lists none (an older release, or no grammar library) gets no request
that needs one: :func:`request_features` says what a request needs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sdk.mesh.capacity import AdvertFieldError, Capacity, parse_hardware
from sdk.mesh.prefixes import PrefixSummary

log = logging.getLogger(__name__)

_MAX_COUNT = 2**31

#: Features a node can advertise today (names of other, newer features are accepted and kept).
JSON_SCHEMA, JSON_OBJECT, TOOLS = "json_schema", "json_object", "tools"
FEATURES = (JSON_OBJECT, JSON_SCHEMA, TOOLS)
#: Bounds on an advertised ``features`` list.
MAX_FEATURES = 32
_FEATURE_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,31}")


def parse_features(body: Any) -> tuple[str, ...]:
    """The advert's ``features`` list, checked: at most :data:`MAX_FEATURES` distinct short
    lower-case names (``[a-z][a-z0-9_.-]``, up to 32 characters); sorted."""
    if body is None:
        return ()
    if not isinstance(body, list):
        raise AdvertFieldError("features", "must be a list of names")
    if len(body) > MAX_FEATURES:
        raise AdvertFieldError("features", f"at most {MAX_FEATURES} names, got {len(body)}")
    for name in body:
        if not isinstance(name, str) or not _FEATURE_NAME.fullmatch(name):
            raise AdvertFieldError("features", f"{str(name)[:40]!r} is not a feature name ([a-z][a-z0-9_.-], "
                                               "at most 32 characters)")
    if len(set(body)) != len(body):
        raise AdvertFieldError("features", "names must be distinct")
    return tuple(sorted(body))


def request_features(request: Any) -> frozenset[str]:
    """The features a node must advertise to be sent ``request`` (a ``GenerationRequest``):
    its ``response_format`` type (``json_schema`` / ``json_object``) and ``tools``."""
    needs: set[str] = set()
    fmt = getattr(request, "response_format", None)
    if isinstance(fmt, Mapping) and fmt.get("type") in (JSON_SCHEMA, JSON_OBJECT):
        needs.add(str(fmt["type"]))
    if getattr(request, "tools", None) is not None:
        needs.add(TOOLS)
    return frozenset(needs)


async def engine_features(engine: Any, *, timeout: float = 30.0) -> tuple[str, ...]:
    """The features ``engine`` honours, to advertise.

    An engine that says (a ``features`` attribute, as :class:`~sdk.testing.FakeEngine`) is taken
    at its word. The inference engine renders ``tools`` through its chat template (plain
    Python), and constrains output when its grammar compiler builds for its tokenizer and
    compiles a JSON grammar within ``timeout`` seconds (the compiler is the one its first
    constrained request would use). Anything else advertises nothing.
    """
    declared = getattr(engine, "features", None)
    if declared is not None:
        names = declared() if callable(declared) else declared
        try:
            return parse_features(list(names))
        except (AdvertFieldError, TypeError) as exc:
            log.warning("engine features %r not advertised: %s", names, exc)
            return ()
    if not callable(getattr(engine, "grammar_compiler", None)):
        return ()
    found = [TOOLS]
    try:
        from sdk.inference.constraints import constraint_from

        async with asyncio.timeout(timeout):
            compiler = await engine.grammar_compiler()
            await asyncio.to_thread(compiler.matcher, constraint_from({"type": JSON_OBJECT}))
        found += [JSON_OBJECT, JSON_SCHEMA]
    except TimeoutError:
        log.warning("the grammar compiler did not build in %.0fs: constrained output not advertised", timeout)
    except Exception as exc:  # noqa: BLE001 - no grammar library (or a broken one): advertise without
        log.warning("constrained output not advertised (%s: %s)", type(exc).__name__, exc)
    return tuple(sorted(found))


def supports(advert: NodeAdvert, needs: Iterable[str]) -> bool:
    """Whether ``advert`` lists every feature in ``needs``."""
    return set(needs) <= set(advert.features)


@dataclass(frozen=True)
class NodeLoad:
    """Live load figures a node reports."""

    queue_depth: int = 0
    active_streams: int = 0
    max_batch_size: int = 1
    tokens_per_s: float = 0.0
    free_cache_tokens: int = 0

    @property
    def utilisation(self) -> float:
        """(queued + active) / capacity, 0 when idle; can exceed 1 when requests queue."""
        return (self.queue_depth + self.active_streams) / max(self.max_batch_size, 1)


@dataclass(frozen=True)
class NodeAdvert:
    """One advertisement (the body of an ``inference.advert`` message)."""

    node_id: str
    did: str
    epoch: float  # the node's boot time: a restart starts a new sequence
    seq: int
    models: tuple[str, ...]
    metadata: Mapping[str, Any] = field(default_factory=dict)  # model metadata document
    hardware: Mapping[str, Any] = field(default_factory=dict)
    load: NodeLoad = field(default_factory=NodeLoad)
    online: bool = True
    interval_s: float = 2.0
    capacity: Capacity | None = None
    prefixes: PrefixSummary | None = None
    features: tuple[str, ...] = ()

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "node": self.node_id,
            "did": self.did,
            "epoch": self.epoch,
            "seq": self.seq,
            "models": list(self.models),
            "metadata": dict(self.metadata),
            "hardware": dict(self.hardware),
            "load": {
                "queue_depth": self.load.queue_depth,
                "active_streams": self.load.active_streams,
                "max_batch_size": self.load.max_batch_size,
                "tokens_per_s": self.load.tokens_per_s,
                "free_cache_tokens": self.load.free_cache_tokens,
            },
            "online": self.online,
            "interval_s": self.interval_s,
        }
        if self.capacity is not None:
            body["capacity"] = self.capacity.to_body()
        if self.prefixes is not None:
            body["prefixes"] = self.prefixes.to_body()
        if self.features:
            body["features"] = list(self.features)
        return body

    @classmethod
    def from_body(cls, body: Any) -> NodeAdvert:
        """Parse an advertisement body; ``ValueError`` when it is malformed."""
        if not isinstance(body, dict):
            raise ValueError("advertisement body must be an object")
        try:
            load = body.get("load") or {}
            if not isinstance(load, dict):
                raise AdvertFieldError("load", "must be an object")
            return cls(
                node_id=str(body["node"]),
                did=str(body["did"]),
                epoch=float(body["epoch"]),
                seq=int(body["seq"]),
                models=tuple(str(m) for m in body.get("models", ())),
                metadata=dict(body.get("metadata") or {}),
                hardware=parse_hardware(body.get("hardware") or None),
                load=NodeLoad(
                    queue_depth=_count(load, "queue_depth", 0),
                    active_streams=_count(load, "active_streams", 0),
                    max_batch_size=_count(load, "max_batch_size", 1),
                    tokens_per_s=_number(load, "tokens_per_s"),
                    free_cache_tokens=_count(load, "free_cache_tokens", 0),
                ),
                online=bool(body.get("online", True)),
                interval_s=float(body.get("interval_s", 2.0)),
                capacity=Capacity.from_body(body.get("capacity")),
                prefixes=PrefixSummary.from_body(body.get("prefixes")),
                features=parse_features(body.get("features")),
            )
        except AdvertFieldError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed advertisement: {exc}") from exc


def _count(load: Mapping[str, Any], name: str, default: int) -> int:
    value = load.get(name, default)
    if type(value) is not int or not 0 <= value <= _MAX_COUNT:
        raise AdvertFieldError(f"load.{name}", f"must be an integer in [0, 2^31], got {value!r}")
    return value


def _number(load: Mapping[str, Any], name: str) -> float:
    value = load.get(name, 0.0)
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise AdvertFieldError(f"load.{name}", f"must be a finite non-negative number, got {value!r}")
    return float(value)


@dataclass
class _Entry:
    advert: NodeAdvert
    received_at: float
    first_seen: float


class AdvertTable:
    """The router's view of live nodes, fed by advertisements and death notices."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic, stale_after: float = 3.0) -> None:
        self._clock = clock
        self._stale_factor = stale_after
        self._entries: dict[str, _Entry] = {}

    def apply(self, advert: NodeAdvert) -> bool:
        """Record ``advert``; ``False`` (ignored) when it is older than what we hold."""
        now = self._clock()
        current = self._entries.get(advert.node_id)
        if current is not None and self._stale(current, now):
            del self._entries[advert.node_id]
            current = None
        if current is not None:
            held = current.advert
            if advert.did != held.did:
                return False  # a node id stays with its DID while that node lives, whatever the epoch
            if (advert.epoch, advert.seq) <= (held.epoch, held.seq):
                return False
        if not advert.online:
            self._entries.pop(advert.node_id, None)
            return True
        first = current.first_seen if current is not None and current.advert.epoch == advert.epoch else now
        self._entries[advert.node_id] = _Entry(advert, now, first)
        return True

    def _stale(self, entry: _Entry, now: float) -> bool:
        return now - entry.received_at > self._stale_factor * max(entry.advert.interval_s, 0.1)

    def mark_dead(self, node_id: str) -> None:
        """Forget a node at once (death notice, or a failed request that proved it gone)."""
        self._entries.pop(node_id, None)

    def live(self, model: str | None = None) -> list[NodeAdvert]:
        """Nodes whose last advertisement is fresh, optionally serving ``model``."""
        now = self._clock()
        out = []
        for node_id, entry in list(self._entries.items()):
            if self._stale(entry, now):
                del self._entries[node_id]
                continue
            if model is None or model in entry.advert.models:
                out.append(entry.advert)
        return out

    def uptime(self, node_id: str) -> float:
        entry = self._entries.get(node_id)
        return 0.0 if entry is None else self._clock() - entry.first_seen

    def get(self, node_id: str) -> NodeAdvert | None:
        entry = self._entries.get(node_id)
        return None if entry is None else entry.advert

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["NodeLoad", "NodeAdvert", "AdvertTable", "FEATURES", "JSON_OBJECT", "JSON_SCHEMA", "TOOLS",
           "MAX_FEATURES", "engine_features", "parse_features", "request_features", "supports"]
