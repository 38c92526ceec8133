"""What a node can do: its hardware, its measured capacity, and the router's time estimates.

A node measures its engine at start (:func:`calibrate`: prefill and decode tokens/s at batch 1
and at full batch, bounded to a couple of seconds) and keeps the figures fresh from its finished
requests (:class:`LiveCapacity`). Both travel in the signed advert, validated strictly on the
way in (:func:`parse_hardware`, :meth:`Capacity.from_body`). The router turns them, with the
node's queue and streams, into an :class:`Estimate` of time to first token and to completion
(:func:`estimate`), so an idle GPU node beats an idle CPU node from the first request and a
busy fast node loses to a free one when waiting would take longer.

Nothing here imports torch: a router-only process reads the advertised figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sdk.errors import MeshError

log = logging.getLogger(__name__)

#: Bounds on advertised figures (a rate above this is not a measurement).
MAX_RATE = 1e7
MAX_BATCH = 4096
MAX_MEMORY_BYTES = 2**50
_MAX_TEXT = 128
_HARDWARE_KEYS = frozenset({"device", "name", "count", "memory_bytes", "dtype"})
_SOURCES = frozenset({"calibration", "live", "declared"})


class AdvertFieldError(MeshError, ValueError):
    """An advertised (or routing-policy) field is malformed; ``field`` names it, and the whole
    message is rejected (reason ``malformed_advert``)."""

    reason = "malformed_advert"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _rate(body: Mapping[str, Any], name: str, *, where: str) -> float:
    value = body.get(name)
    if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= MAX_RATE:  # type: ignore[arg-type,operator]
        raise AdvertFieldError(f"{where}.{name}", f"must be a finite number in [0, {MAX_RATE:g}], got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _text(value: Any, field: str, *, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value or len(value) > _MAX_TEXT or not value.isprintable():
        raise AdvertFieldError(field, f"must be a printable string of at most {_MAX_TEXT} characters")
    return value


def parse_hardware(body: Any) -> dict[str, Any]:
    """The advert's ``hardware`` object, checked: device type, accelerator name, count, memory, dtype."""
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise AdvertFieldError("hardware", "must be an object")
    unknown = set(body) - _HARDWARE_KEYS
    if unknown:
        raise AdvertFieldError("hardware", f"unknown keys {sorted(unknown)}")
    out: dict[str, Any] = {}
    if "device" in body:
        out["device"] = _text(body["device"], "hardware.device", optional=False)
    if "name" in body:
        out["name"] = _text(body["name"], "hardware.name")
    if "dtype" in body:
        out["dtype"] = _text(body["dtype"], "hardware.dtype")
    if "count" in body:
        count = body["count"]
        if type(count) is not int or not 0 <= count <= 1024:
            raise AdvertFieldError("hardware.count", f"must be an integer in [0, 1024], got {count!r}")
        out["count"] = count
    if "memory_bytes" in body:
        memory = body["memory_bytes"]
        if memory is not None and (type(memory) is not int or not 0 <= memory <= MAX_MEMORY_BYTES):
            raise AdvertFieldError("hardware.memory_bytes", f"must be null or an integer in [0, 2^50], got {memory!r}")
        out["memory_bytes"] = memory
    return out


def detect_hardware(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Hardware from the engine's metadata document (device type, name, count, memory, dtype).

    The engine fills ``device`` from torch where it runs; this reads only the document, so it
    never imports torch. Values that would not pass :func:`parse_hardware` are left out.
    """
    found = metadata.get("device")
    device: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    raw = {"device": device.get("type", "cpu"), "name": device.get("name"), "count": device.get("count", 1),
           "memory_bytes": device.get("memory_bytes"), "dtype": metadata.get("dtype")}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out.update(parse_hardware({key: value}))
        except AdvertFieldError:
            log.warning("engine metadata: hardware %s %r left out of the advert", key, value)
    out.setdefault("device", "cpu")
    return out


@dataclass(frozen=True)
class Capacity:
    """Measured throughput: prefill and decode tokens/s at batch 1 and (aggregate) at ``batch``."""

    prefill_1: float  # prompt tokens/s, one request alone
    decode_1: float  # generated tokens/s, one stream alone
    prefill_full: float  # prompt tokens/s summed over a full batch
    decode_full: float  # generated tokens/s summed over ``batch`` streams
    batch: int
    source: str = "calibration"  # calibration | live | declared

    def __post_init__(self) -> None:
        for name in ("prefill_1", "decode_1", "prefill_full", "decode_full"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and 0 <= value <= MAX_RATE):
                raise AdvertFieldError(f"capacity.{name}", f"must be a finite number in [0, {MAX_RATE:g}]")
        if type(self.batch) is not int or not 1 <= self.batch <= MAX_BATCH:
            raise AdvertFieldError("capacity.batch", f"must be an integer in [1, {MAX_BATCH}]")
        if self.source not in _SOURCES:
            raise AdvertFieldError("capacity.source", f"must be one of {sorted(_SOURCES)}")

    def decode_per_stream(self, streams: int) -> float:
        """Tokens/s each of ``streams`` concurrent streams gets (aggregate interpolated 1 .. batch)."""
        k = max(1, streams)
        if self.batch == 1:
            return self.decode_1
        if k >= self.batch:
            return self.decode_full / self.batch
        frac = (k - 1) / (self.batch - 1)
        return (self.decode_1 + frac * (self.decode_full - self.decode_1)) / k

    def prefill_rate(self, streams: int) -> float:
        """Prompt tokens/s a new request gets while ``streams`` others run."""
        k = max(1, streams + 1)
        if self.batch == 1:
            return self.prefill_1
        frac = min((k - 1) / (self.batch - 1), 1.0)
        return (self.prefill_1 + frac * (self.prefill_full - self.prefill_1)) / k

    def to_body(self) -> dict[str, Any]:
        return {"prefill_1": round(self.prefill_1, 3), "decode_1": round(self.decode_1, 3),
                "prefill_full": round(self.prefill_full, 3), "decode_full": round(self.decode_full, 3),
                "batch": self.batch, "source": self.source}

    @classmethod
    def from_body(cls, body: Any) -> Capacity | None:
        """The advert's ``capacity`` (None when absent); :class:`AdvertFieldError` when malformed."""
        if body is None:
            return None
        if not isinstance(body, dict):
            raise AdvertFieldError("capacity", "must be an object")
        unknown = set(body) - {"prefill_1", "decode_1", "prefill_full", "decode_full", "batch", "source"}
        if unknown:
            raise AdvertFieldError("capacity", f"unknown keys {sorted(unknown)}")
        batch = body.get("batch")
        if type(batch) is not int:
            raise AdvertFieldError("capacity.batch", f"must be an integer, got {batch!r}")
        source = body.get("source", "calibration")
        if not isinstance(source, str):
            raise AdvertFieldError("capacity.source", "must be a string")
        return cls(prefill_1=_rate(body, "prefill_1", where="capacity"), decode_1=_rate(body, "decode_1", where="capacity"),
                   prefill_full=_rate(body, "prefill_full", where="capacity"),
                   decode_full=_rate(body, "decode_full", where="capacity"), batch=batch, source=source)


@dataclass(frozen=True)
class Estimate:
    """The router's estimate for one request on one node (seconds) and its parts."""

    ttft_s: float  # queue wait + prefill of the uncached prompt + one decode step
    total_s: float  # ttft + the remaining tokens at the per-stream decode rate
    wait_s: float
    prefill_s: float
    decode_s: float
    streams: int  # streams the node will run with this request admitted
    cached_tokens: int

    def parts(self) -> dict[str, float]:
        return {"wait": self.wait_s, "prefill": self.prefill_s, "decode": self.decode_s,
                "ttft": self.ttft_s, "total": self.total_s}


def estimate(capacity: Capacity, *, queue_depth: int, active_streams: int, inflight: int = 0,
             prompt_tokens: int, cached_tokens: int = 0, max_new_tokens: int) -> Estimate:
    """Time to first token and to completion of a request on a node with ``capacity``.

    ``active_streams``/``queue_depth`` come from the node's advert, ``inflight`` from this router's
    own requests there (counted when above what the advert shows: the advert may predate them).
    A request that finds every slot taken waits, per request queued ahead of it, for a batch
    slot to free (about one typical request's decode at full batch, shared by ``batch`` slots).
    """
    running = max(active_streams, 0)
    queued = max(queue_depth, 0)
    ahead = max(running + queued, inflight)
    slots = capacity.batch
    streams = min(ahead + 1, slots)
    per_stream = max(capacity.decode_per_stream(streams), 1e-6)
    wait = 0.0
    if ahead >= slots:
        service = max_new_tokens / max(capacity.decode_per_stream(slots), 1e-6)
        wait = (ahead - slots + 1) / slots * service
    uncached = max(prompt_tokens - max(cached_tokens, 0), 0)
    prefill = uncached / max(capacity.prefill_rate(streams - 1), 1e-6)
    first = 1.0 / per_stream
    decode = max(max_new_tokens - 1, 0) / per_stream
    ttft = wait + prefill + first
    return Estimate(ttft_s=ttft, total_s=ttft + decode, wait_s=wait, prefill_s=prefill, decode_s=decode + first,
                    streams=streams, cached_tokens=max(min(cached_tokens, prompt_tokens), 0))


# ------------------------------------------------------------------ measuring


async def _run(engine: Any, prompt_ids: list[int], new_tokens: int) -> tuple[float, float, int]:
    """(time to first token, decode seconds after it, tokens) of one request on ``engine``."""
    from sdk.inference.types import GenerationRequest

    req = GenerationRequest(prompt_token_ids=prompt_ids, max_new_tokens=new_tokens, temperature=0.0,
                            request_id=f"calibration-{time.monotonic_ns()}")
    start = time.perf_counter()
    first: float | None = None
    n = 0
    stream = engine.stream(req)
    try:
        async for chunk in stream:
            if chunk.token_ids:
                first = first or time.perf_counter()
                n += len(chunk.token_ids)
    finally:
        await stream.aclose()
    end = time.perf_counter()
    first = first or end
    return first - start, end - first, n


def _bounded(value: float) -> float:
    return min(max(value, 0.0), MAX_RATE) if math.isfinite(value) else MAX_RATE


async def calibrate(engine: Any, *, budget_s: float = 2.0, prompt_tokens: int = 128, new_tokens: int = 16,
                    batch: int | None = None) -> Capacity | None:
    """Measure ``engine``: one request alone, then a full batch at once (bounded by ``budget_s``).

    Prompts are token ids in [100, 1100) (inside any real vocabulary), distinct per request so
    a prefix cache does not flatter prefill. None when the engine could not be measured in time.
    """
    stats = engine.stats() if hasattr(engine, "stats") else {}
    slots = int(batch or stats.get("max_batch_size", 1) or 1)
    slots = min(max(slots, 1), MAX_BATCH)
    max_len = int(getattr(engine, "max_sequence_length", 0) or engine.metadata.get("context_length", 0) or 0)
    if max_len:
        prompt_tokens = max(min(prompt_tokens, max_len - new_tokens - 1), 1)

    def prompt(i: int) -> list[int]:
        return [100 + (i * 7919 + j * 104729) % 1000 for j in range(prompt_tokens)]

    try:
        async with asyncio.timeout(budget_s):
            ttft, decode_s, n = await _run(engine, prompt(0), new_tokens)
            prefill_1 = _bounded(prompt_tokens / ttft if ttft > 0 else MAX_RATE)
            decode_1 = _bounded((n - 1) / decode_s if n > 1 and decode_s > 0 else MAX_RATE)
            prefill_full, decode_full = prefill_1, decode_1
            if slots > 1:
                start = time.perf_counter()
                runs = await asyncio.gather(*(_run(engine, prompt(i + 1), new_tokens) for i in range(slots)))
                firsts = max(r[0] for r in runs)
                elapsed = time.perf_counter() - start
                prefill_full = _bounded(slots * prompt_tokens / firsts if firsts > 0 else MAX_RATE)
                tokens = sum(max(r[2] - 1, 0) for r in runs)
                span = elapsed - firsts
                decode_full = _bounded(tokens / span if span > 0 and tokens else decode_1 * slots)
    except TimeoutError:
        log.warning("capacity calibration did not finish in %.1fs: no measured capacity advertised", budget_s)
        return None
    except Exception as exc:  # noqa: BLE001 - a node without figures still serves
        log.warning("capacity calibration failed (%s: %s): no measured capacity advertised", type(exc).__name__, exc)
        return None
    cap = Capacity(prefill_1=prefill_1, decode_1=decode_1, prefill_full=max(prefill_full, prefill_1),
                   decode_full=max(decode_full, decode_1), batch=slots)
    log.info("capacity: prefill %.0f tok/s (batch 1) / %.0f (batch %d), decode %.1f / %.1f tok/s",
             cap.prefill_1, cap.prefill_full, slots, cap.decode_1, cap.decode_full)
    return cap


class LiveCapacity:
    """A node's capacity kept fresh from finished requests (exponentially weighted).

    A request that ran alone refreshes the batch-1 figures; one that ran with the batch full
    refreshes the full-batch aggregate. Declared figures are never overwritten.
    """

    def __init__(self, initial: Capacity | None, *, weight: float = 0.2) -> None:
        self.capacity = initial
        self.weight = weight

    def observe(self, usage: Any, *, streams: int) -> None:
        cap = self.capacity
        if cap is None or cap.source == "declared" or usage is None:
            return
        w = self.weight
        changes: dict[str, float] = {}
        rate = float(getattr(usage, "tokens_per_s", 0.0) or 0.0)
        ttft = float(getattr(usage, "time_to_first_token_s", 0.0) or 0.0)
        uncached = int(getattr(usage, "prompt_tokens", 0) or 0) - int(getattr(usage, "cached_prompt_tokens", 0) or 0)
        if streams <= 1:
            if 0 < rate <= MAX_RATE:
                changes["decode_1"] = (1 - w) * cap.decode_1 + w * rate
            if ttft > 0 and uncached >= 32:
                changes["prefill_1"] = (1 - w) * cap.prefill_1 + w * _bounded(uncached / ttft)
        elif streams >= cap.batch and 0 < rate <= MAX_RATE:
            changes["decode_full"] = (1 - w) * cap.decode_full + w * _bounded(rate * streams)
        if changes:
            with contextlib.suppress(ValueError):
                self.capacity = replace(cap, source="live", **changes)  # type: ignore[arg-type]


__all__ = ["AdvertFieldError", "Capacity", "Estimate", "LiveCapacity", "calibrate", "detect_hardware", "estimate",
           "parse_hardware", "MAX_RATE"]
