"""``MeshNode``: an engine joins the mesh — it advertises itself and serves permitted peers.

    async with MeshNode(engine, "mqtt://127.0.0.1:1883", key=key, access=AccessPolicy(trust)) as node:
        ...   # adverts every few seconds; requests on autoglm/v1/inf/req/{node_id}

Adverts are signed and retained and carry the node's ``InferenceNodeCredential`` (routers use
only credentialed nodes); the MQTT will is a pre-signed death advert (highest sequence number of
the boot), so routers drop the node the moment its connection dies. Requests must be encrypted
to the node's DID (refused by the secure client otherwise) and carry an
``InferenceAccessCredential`` covering the model and the requested tokens. Each peer is
rate-limited before any credential work (every request counts, refused or not) and may hold at
most ``max_streams_per_peer`` generations at once. The node follows its issuers' status lists
live: a revocation refuses the peer's next request. A requester's ``cancel`` (or a dropped
router) cancels the engine request and frees its slot.

Adverts also carry the node's hardware, its capacity (declared in :class:`NodeConfig`, or
measured by a short calibration at start with ``calibrate=True``, then refreshed from finished
requests) and, with a mesh ``prefix_key``, a bounded summary of the prompt prefixes it served
(``sdk.mesh.prefixes``), so routers can estimate its speed and keep conversations on it. They
list the request features the engine honours (``sdk.mesh.adverts.engine_features``, found at
start, or declared in :class:`NodeConfig`), so routers send constrained requests only to nodes
that can constrain them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from sdk.errors import InferenceError
from sdk.identity import Key
from sdk.mesh import topics as mesh_topics
from sdk.mesh.adverts import NodeAdvert, NodeLoad, engine_features, parse_features
from sdk.mesh.capacity import Capacity, LiveCapacity, calibrate, detect_hardware
from sdk.mesh.credentials import AccessPolicy
from sdk.mesh.prefixes import DEFAULT_BLOCK, PrefixHasher, PrefixIndex, continuation, prompt_bytes
from sdk.mesh.protocol import ADVERT, Refusal, chunk_body, parse_request
from sdk.mesh.ratelimit import PeerBuckets, PeerStreams, RateLimit
from sdk.messaging import topics
from sdk.messaging.client import CANCEL, ClientConfig, SecureClient
from sdk.messaging.envelope import Message, Signer
from sdk.messaging.errors import MessagingError, RejectedMessage
from sdk.messaging.will import presigned_will

log = logging.getLogger(__name__)

#: Sequence number of the death advert pre-signed as the MQTT will: above any live advert of the boot.
WILL_SEQ = 2**53 - 1
_WILL_TTL_S = 365 * 86400


@dataclass(frozen=True)
class NodeConfig:
    """``node_id`` defaults to the DID's token (``z6Mk...``); ``model_name`` to the metadata name."""

    node_id: str | None = None
    model_name: str | None = None
    advert_interval: float = 2.0
    rate_limit: RateLimit = RateLimit()
    max_streams_per_peer: int = 8  # generations one peer DID may have running or queued at once
    hardware: Mapping[str, Any] | None = None
    capacity: Capacity | None = None  # declared figures (advertised as "declared", never overwritten)
    calibrate: bool = False  # measure the engine at start (bounded by calibration_s) when none is declared
    calibration_s: float = 2.0
    prefix_key: bytes | None = None  # the mesh's prefix key: without one no prefix summary is advertised
    prefix_block: int = DEFAULT_BLOCK
    prefix_capacity: int = 4096  # prefix hashes remembered (LRU)
    prefix_advertise: int = 512  # most recent hashes in each advert
    features: tuple[str, ...] | None = None  # declared request features; None: found from the engine at start

    def __post_init__(self) -> None:
        if not self.advert_interval > 0:
            raise ValueError("advert_interval must be > 0")
        if type(self.max_streams_per_peer) is not int or self.max_streams_per_peer < 1:
            raise ValueError("max_streams_per_peer must be a positive integer")
        if self.node_id is not None:
            topics.validate_id(self.node_id, what="node id")
        if not 0 < self.calibration_s <= 30:
            raise ValueError("calibration_s must be in (0, 30]")
        if self.features is not None:
            parse_features(list(self.features))  # AdvertFieldError (a ValueError) when malformed


class MeshNode:
    """Serves one :class:`~sdk.inference.Engine` to permitted mesh peers (``async with``).

    ``credential``: this node's ``InferenceNodeCredential`` (see
    :func:`sdk.mesh.issue_node_credential`), attached to every advert and to the will; without
    one, routers that require node credentials (the default) ignore the node.
    """

    def __init__(
        self,
        engine: Any,
        broker: Any,
        *,
        key: Key,
        access: AccessPolicy,
        credential: Any = None,
        config: NodeConfig = NodeConfig(),
        client_config: ClientConfig | None = None,
        **transport_options: Any,
    ) -> None:
        if not isinstance(access, AccessPolicy):
            raise TypeError("access must be an AccessPolicy")
        self.engine = engine
        self.key = key
        self.did = key.did
        self.access = access
        self.config = config
        self.node_id = config.node_id or topics.client_token(key.did)
        meta = dict(engine.metadata)
        self.model = config.model_name or str(meta.get("name") or "model")
        self.metadata = meta
        self.hardware = dict(config.hardware) if config.hardware is not None else detect_hardware(meta)
        declared = dataclasses.replace(config.capacity, source="declared") if config.capacity is not None else None
        self.capacity = LiveCapacity(declared)
        self.prefixes = PrefixIndex(PrefixHasher(config.prefix_key, block=config.prefix_block),
                                    capacity=config.prefix_capacity, advertise=config.prefix_advertise)
        self.features: tuple[str, ...] = parse_features(list(config.features)) if config.features is not None else ()
        self.epoch = round(time.time(), 3)
        self.advert_topic = mesh_topics.inference_ad(self.node_id)
        self.request_topic = mesh_topics.inference_requests(self.node_id)
        self.credential = credential
        self._advert_creds = (credential,) if credential is not None else None
        if credential is None:
            log.warning("mesh node %s has no InferenceNodeCredential: routers requiring one will not use it",
                        self.node_id)
        self._seq = 0
        self._buckets = PeerBuckets(config.rate_limit)
        self._streams = PeerStreams(config.max_streams_per_peer)
        self.refusals: Counter[str] = Counter()
        self.served = 0
        self.cancelled = 0
        self.active = 0
        will_body = self._advert(online=False, seq=WILL_SEQ).to_body()
        will = presigned_will(Signer(key), self.advert_topic, will_body, type=ADVERT, ttl=_WILL_TTL_S,
                              credentials=self._advert_creds)
        transport_options.setdefault("will", will)
        self.client = SecureClient(broker, key, config=client_config or ClientConfig(), **transport_options)
        self._advert_task: asyncio.Task[None] | None = None
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> MeshNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect, serve requests, publish the first advert and keep advertising."""
        if self.config.calibrate and self.capacity.capacity is None:
            self.capacity.capacity = await calibrate(self.engine, budget_s=self.config.calibration_s)
        if self.config.features is None:
            self.features = await engine_features(self.engine)
        await self.client.connect()
        if not await self.access.status.attach(self.client):
            log.warning("mesh node %s cannot follow status lists: revocations arrive only on recheck",
                        self.node_id)
        self.access.bind(self.client.authorizer)
        await self.client.serve(self.request_topic, self._handle, encrypted=True, gate=self._gate)
        self.client.transport.add_on_connect(self._on_reconnect)
        await self.advertise()
        self._advert_task = asyncio.ensure_future(self._advert_loop())
        self._started = True
        log.info("mesh node %s (%s) serving %s on %s (features: %s)", self.node_id, self.did, self.model,
                 self.request_topic, ", ".join(self.features) or "none")

    async def aclose(self) -> None:
        """Publish a retained death advert, stop serving and disconnect (no will is sent)."""
        if not self._started:
            return
        self._started = False
        await self._stop_adverts()
        if self.client.connected:
            with contextlib.suppress(MessagingError, OSError):
                await self.advertise(online=False)
        await self.client.aclose()

    async def abort(self) -> None:
        """Crash on purpose (tests, benchmarks): drop the connection without DISCONNECT, so the
        broker publishes the will, then cancel in-flight requests."""
        self._started = False
        await self._stop_adverts()
        await self.client.transport.abort()  # no DISCONNECT: the will fires
        await self.client.aclose()

    async def _stop_adverts(self) -> None:
        if self._advert_task is not None:
            self._advert_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._advert_task
            self._advert_task = None

    # ------------------------------------------------------------------ adverts

    def load(self) -> NodeLoad:
        """Live load figures from the engine."""
        s = self.engine.stats()
        return NodeLoad(
            queue_depth=int(s.get("queue_depth", 0)),
            active_streams=int(s.get("active_streams", 0)),
            max_batch_size=int(s.get("max_batch_size", 1)),
            tokens_per_s=float(s.get("tokens_per_s", 0.0)),
            free_cache_tokens=int(s.get("free_cache_tokens", 0)),
        )

    def _advert(self, *, online: bool = True, seq: int | None = None) -> NodeAdvert:
        if seq is None:
            self._seq += 1
            seq = self._seq
        return NodeAdvert(
            node_id=self.node_id, did=self.did, epoch=self.epoch, seq=seq, models=(self.model,),
            metadata=self.metadata if online else {}, hardware=self.hardware if online else {},
            load=self.load() if online else NodeLoad(), online=online, interval_s=self.config.advert_interval,
            capacity=self.capacity.capacity if online else None,
            prefixes=self.prefixes.summary() if online else None, features=self.features if online else (),
        )

    async def advertise(self, *, online: bool = True) -> NodeAdvert:
        """Publish one advert now (retained; expires three intervals plus the allowed clock skew later)."""
        advert = self._advert(online=online)
        ttl = None if not online else 3 * self.config.advert_interval + self.client.config.policy.clock_skew
        await self.client.publish(self.advert_topic, advert.to_body(), type=ADVERT, retain=True, ttl=ttl,
                                  credentials=self._advert_creds)
        return advert

    async def _advert_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.advert_interval)
            try:
                await self.advertise()
            except MessagingError as exc:
                log.warning("advert from %s failed: %s", self.node_id, exc)

    async def _on_reconnect(self, *args: Any) -> None:
        with contextlib.suppress(MessagingError):
            await self.advertise()

    # ------------------------------------------------------------------ requests

    def _gate(self, msg: Message) -> RejectedMessage | None:
        """Before any credential work: every request costs its sender a token, and a sender at its
        stream cap is refused (``cancel`` always passes, so a limited peer can still stop)."""
        if msg.type == CANCEL:
            return None
        if not self._buckets.allow(msg.sender):
            self.refusals["rate_limited"] += 1
            return RejectedMessage(f"{msg.sender} exceeds {self.config.rate_limit.rate} requests/s",
                                   reason="rate_limited")
        if self._streams.full(msg.sender):
            self.refusals["too_many_streams"] += 1
            return RejectedMessage(f"{msg.sender} already has {self.config.max_streams_per_peer} streams",
                                   reason="too_many_streams")
        return None

    async def _handle(self, msg: Message) -> AsyncIterator[dict[str, Any]]:
        try:
            model, fields, held = parse_request(msg.body)
            if model != self.model:
                raise Refusal(f"this node serves {self.model!r}, not {model!r}", reason="model_not_found")
            max_tokens = fields.get("max_new_tokens", 256)
            if type(max_tokens) is not int:
                raise Refusal("max_new_tokens must be an integer", reason="invalid_request")
            self.access.check(msg, model=model, max_tokens=max_tokens, authorizer=self.client.authorizer)
            from sdk.inference.errors import InvalidRequest
            from sdk.inference.types import GenerationRequest

            try:
                req = GenerationRequest(**fields, request_id=f"mesh-{uuid.uuid4().hex}").validate()
            except (TypeError, ValueError, InvalidRequest) as exc:  # a bad schema keeps its reason (invalid_schema...)
                raise Refusal(str(exc), reason=getattr(exc, "reason", "invalid_request")) from None
            if not self._streams.acquire(msg.sender):  # the gate's check, now exact (no await since)
                raise Refusal(f"{msg.sender} already has {self.config.max_streams_per_peer} streams",
                              reason="too_many_streams")
        except Refusal as exc:
            self.refusals[exc.reason] += 1
            raise
        return self._counted(self._generate(req, held), msg.sender)

    async def _counted(self, chunks: AsyncIterator[dict[str, Any]], peer: str) -> AsyncIterator[dict[str, Any]]:
        """``chunks``, releasing ``peer``'s stream slot (taken by the handler) however they end."""
        try:
            async for body in chunks:
                yield body
        finally:
            self._streams.release(peer)
            await chunks.aclose()  # type: ignore[attr-defined]

    async def _generate(self, req: Any, held: int) -> AsyncIterator[dict[str, Any]]:
        """Run ``req`` on the engine; yield chunk bodies (the first with the prompt's token ids)."""
        try:
            send_prompt = req.prompt_token_ids is None
            prompt_ids = self.engine.encode(req) if send_prompt else list(req.prompt_token_ids)
        except InferenceError as exc:
            self.refusals[exc.reason] += 1
            raise Refusal(str(exc), reason=exc.reason) from None
        base = prompt_bytes(prompt=req.prompt, messages=req.messages, prompt_token_ids=req.prompt_token_ids)
        chain = self.prefixes.hasher.chain(base)
        self.prefixes.lookup(chain)
        self.prefixes.add(chain)
        replies: list[str] = []
        req = dataclasses.replace(req, prompt=None, messages=None, prompt_token_ids=prompt_ids, tools=None)  # tools: in the ids
        detok, pending = None, ""
        if held and not req.stop:
            detok, pending = _held_detokenizer(self.engine.tokenizer, prompt_ids, held)
        stream = self.engine.stream(req)
        self.active += 1
        first = True
        try:
            async for chunk in stream:
                text = None
                if detok is not None:
                    text = pending + "".join(detok.push(t) for t in chunk.token_ids)
                    pending = ""
                    if chunk.finish_reason is not None:
                        text += detok.flush()
                replies.append(chunk.text)
                if chunk.finish_reason is not None:
                    self.capacity.observe(chunk.usage, streams=self.active)
                yield chunk_body(chunk, prompt_ids=prompt_ids if first and send_prompt else None, text=text)
                first = False
            self.served += 1
            self.prefixes.add(self.prefixes.hasher.chain(continuation(base, "".join(replies))))
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            log.info("request from a peer cancelled on %s", self.node_id)
            raise
        except InferenceError as exc:
            self.refusals[exc.reason] += 1
            raise Refusal(str(exc), reason=exc.reason) from None
        finally:
            self.active -= 1
            await stream.aclose()

    def stats(self) -> dict[str, Any]:
        """Node counters plus the engine's live figures."""
        return {"node_id": self.node_id, "model": self.model, "served": self.served, "active": self.active,
                "cancelled": self.cancelled, "peers_streaming": len(self._streams),
                "refusals": dict(self.refusals), "prefix_hit_rate": self.prefixes.hit_rate,
                "prefix_lookups": self.prefixes.lookups, "engine": dict(self.engine.stats())}


def _held_detokenizer(tokenizer: Any, ids: list[int], held: int) -> tuple[Any, str]:
    """A detokenizer positioned after the ``held`` trailing ids whose text was never emitted,
    and any of their text it could already produce."""
    from sdk.inference.detokenizer import IncrementalDetokenizer

    detok = IncrementalDetokenizer(tokenizer, ids[:-held])
    pending = "".join(detok.push(t) for t in ids[-held:])  # usually "" (an incomplete character)
    return detok, pending


__all__ = ["MeshNode", "NodeConfig", "WILL_SEQ"]
