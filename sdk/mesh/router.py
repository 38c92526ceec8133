"""``Mesh``: the router any permitted peer runs to use the mesh's nodes.

    async with Mesh("mqtt://127.0.0.1:1883", key, credentials=[access_vc]) as mesh:
        await mesh.wait_for_nodes(model="SmolLM2-135M-Instruct")
        result = await mesh.generate(prompt="Hi", max_new_tokens=16, temperature=0.0)
        async for chunk in mesh.stream(GenerationRequest(...), model="SmolLM2-135M-Instruct"): ...

Nodes are discovered from their signed adverts, ranked (``rank_nodes``: advertised throughput
and load, the router's own in-flight count, observed errors and time to first token) and the
best is asked. If it dies (its death advert / MQTT will arrives) or stalls past a timeout, the
stream continues on the next node from the prompt's token ids plus the tokens already received,
so the caller sees one uninterrupted stream. Leaving the stream early cancels the node's work.
The router is also a ``GenerationBackend`` (``stream``/``generate``/``models``/``stats``), so the
OpenAI HTTP app serves it unchanged (see ``sdk.mesh.gateway``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sdk.identity import Key
from sdk.inference.types import GenerationRequest, GenerationResult, TokenChunk, Usage
from sdk.mesh import topics as mesh_topics
from sdk.mesh.adverts import AdvertTable, NodeAdvert
from sdk.mesh.errors import (
    BUSY_REASONS,
    PERMISSION_REASONS,
    MeshError,
    MeshOverloaded,
    MeshTimeout,
    NodeRequestError,
    NoNode,
    NotPermitted,
)
from sdk.mesh.protocol import ADVERT, GENERATE, request_body
from sdk.mesh.ranking import NodeFigures, RankedNode, RankingWeights, rank_nodes
from sdk.messaging.client import ClientConfig, SecureClient
from sdk.messaging.envelope import Message, Verifier
from sdk.messaging.errors import MessagingError, RejectedMessage, RemoteError

log = logging.getLogger(__name__)

#: Node reasons that mean "this request is wrong", not "this node is wrong": no retry elsewhere.
_REQUEST_REASONS = frozenset({"invalid_request", "prompt_too_long"})
_EWMA = 0.3


@dataclass(frozen=True)
class RouterConfig:
    """Timeouts (seconds), failover budget and ranking weights."""

    first_token_timeout: float = 30.0  # queueing + prefill on the chosen node
    stall_timeout: float = 5.0  # gap between tokens before failing over
    max_attempts: int = 4  # nodes tried for one request (first choice + failovers)
    weights: RankingWeights = RankingWeights()
    stale_after: float = 3.0  # adverts older than this many intervals are ignored

    def __post_init__(self) -> None:
        if not (self.first_token_timeout > 0 and self.stall_timeout > 0 and self.max_attempts >= 1):
            raise ValueError("timeouts must be > 0 and max_attempts >= 1")


@dataclass
class _Observed:
    """What this router saw of one node."""

    inflight: int = 0
    attempts: int = 0
    error_rate: float = 0.0
    ttft_s: float | None = None
    tokens_per_s: float | None = None

    def outcome(self, ok: bool) -> None:
        self.attempts += 1
        self.error_rate = (1 - _EWMA) * self.error_rate + _EWMA * (0.0 if ok else 1.0)


@dataclass
class _Progress:
    """One caller-visible stream across however many nodes serve it."""

    prompt_ids: list[int] | None
    generated: list[int] = field(default_factory=list)
    held: int = 0  # trailing generated tokens whose text has not been emitted
    first_token_at: float | None = None
    failovers: int = 0


class _Watch:
    """One stream's watch on its node: a death advert ends the current wait at once."""

    def __init__(self) -> None:
        self.dead = False
        self.timeout: asyncio.Timeout | None = None

    def kill(self) -> None:
        self.dead = True
        if self.timeout is not None and not self.timeout.expired():
            self.timeout.reschedule(asyncio.get_running_loop().time())


@dataclass(frozen=True)
class NodeView:
    """A live node as ``autoglm nodes`` shows it: its advert and its rank."""

    advert: NodeAdvert
    rank: RankedNode
    figures: NodeFigures


class Mesh:
    """Routes generation requests over the mesh as one permitted peer (``async with``)."""

    def __init__(
        self,
        broker: Any,
        key: Key,
        *,
        credentials: list[Any] | tuple[Any, ...] = (),
        config: RouterConfig = RouterConfig(),
        client_config: ClientConfig | None = None,
        resolver: Any = None,
        default_model: str | None = None,
        **transport_options: Any,
    ) -> None:
        self.key = key
        self.did = key.did
        self.config = config
        self.default_model = default_model
        client_config = client_config or ClientConfig()
        self.client = SecureClient(broker, key, config=client_config, credentials=credentials, resolver=resolver,
                                   **transport_options)
        self.table = AdvertTable(stale_after=config.stale_after)
        self._ad_verifier = Verifier(resolver=resolver, policy=client_config.policy)
        self._observed: dict[str, _Observed] = {}
        self._watchers: dict[str, set[_Watch]] = {}
        self._changed = asyncio.Event()
        self.counters: dict[str, int] = {"requests": 0, "completed": 0, "failovers": 0, "errors": 0,
                                         "adverts": 0, "adverts_rejected": 0}
        self.failures: Counter[str] = Counter()  # per node attempt that did not finish, by reason

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect and subscribe to node adverts (retained ones arrive at once)."""
        await self.client.connect()
        await self.client.transport.subscribe(mesh_topics.ALL_INFERENCE_ADS, qos=1, handler=self._on_advert)

    async def aclose(self) -> None:
        """Disconnect (streams in progress fail)."""
        await self.client.aclose()

    # ------------------------------------------------------------------ discovery

    def _on_advert(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 0) -> None:
        if not payload:
            return  # a cleared retained advert
        try:
            # Adverts are state, ordered by (epoch, seq) inside the signed body: verified like retained
            # messages (no replay window), so a will signed at connect time still counts when it fires.
            msg = self._ad_verifier.open(topic, bytes(payload), retained=True)
            if msg.type != ADVERT:
                raise ValueError(f"type {msg.type!r} on an advert topic")
            advert = NodeAdvert.from_body(msg.body)
            if advert.did != msg.sender:
                raise ValueError(f"advert for {advert.did} signed by {msg.sender}")
            if mesh_topics.inference_ad(advert.node_id) != topic:
                raise ValueError(f"advert for node {advert.node_id!r} on {topic!r}")
            # a retained copy of a node that died without its will (lost by a broker restart) is ignored
            # once older than the staleness window plus the clock skew allowed between hosts
            too_old = self.config.stale_after * advert.interval_s + self._ad_verifier.policy.clock_skew
            if retain and advert.online and time.time() - msg.issued_at > too_old:
                log.debug("ignoring a stale retained advert of %s", advert.node_id)
                return
        except (RejectedMessage, ValueError) as exc:
            self.counters["adverts_rejected"] += 1
            log.warning("rejected advert on %r: %s", topic, exc)
            return
        self.counters["adverts"] += 1
        if self.table.apply(advert):
            if not advert.online:
                log.info("node %s left the mesh", advert.node_id)
                for watch in self._watchers.get(advert.node_id, ()):
                    watch.kill()
            self._changed.set()

    async def wait_for_nodes(self, count: int = 1, *, model: str | None = None, timeout: float = 10.0) -> list[NodeAdvert]:
        """Wait until ``count`` live nodes (serving ``model``) are known; ``NoNode`` after ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            live = self.table.live(model)
            if len(live) >= count:
                return live
            left = deadline - loop.time()
            if left <= 0:
                raise NoNode(f"{len(live)} of {count} node(s) for {model or 'any model'} after {timeout}s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 0.5)):
                    await self._changed.wait()

    def nodes(self, model: str | None = None) -> list[NodeAdvert]:
        """Live nodes (fresh adverts), optionally only those serving ``model``."""
        return self.table.live(model)

    def _figures(self, advert: NodeAdvert) -> NodeFigures:
        obs = self._observed.get(advert.node_id) or _Observed()
        load = advert.load
        capacity = max(load.max_batch_size, 1)
        rate = obs.tokens_per_s
        if rate is None:
            rate = load.tokens_per_s / max(load.active_streams, 1)
        return NodeFigures(
            node_id=advert.node_id,
            tokens_per_s=rate,
            error_rate=obs.error_rate,
            uptime_s=self.table.uptime(advert.node_id),
            load=max(load.utilisation, obs.inflight / capacity),
            latency_s=obs.ttft_s,
        )

    def ranked(self, model: str | None = None, *, exclude: frozenset[str] | set[str] = frozenset()) -> list[NodeView]:
        """Live nodes (for ``model``) best first, with the score's parts."""
        adverts = {a.node_id: a for a in self.table.live(model) if a.node_id not in exclude}
        figures = {nid: self._figures(a) for nid, a in adverts.items()}
        ranks = rank_nodes(list(figures.values()), self.config.weights)
        return [NodeView(adverts[r.node_id], r, figures[r.node_id]) for r in ranks]

    def _model_for(self, req: GenerationRequest, model: str | None) -> str:
        model = model or getattr(req, "model", None) or self.default_model
        if model:
            return model
        names = sorted({m for a in self.table.live() for m in a.models})
        if len(names) == 1:
            return names[0]
        if not names:
            raise NoNode("no node is advertising any model")
        raise NodeRequestError(f"several models on the mesh ({', '.join(names)}); name one", reason="invalid_request")

    # ------------------------------------------------------------------ generation

    async def generate(self, request: GenerationRequest | None = None, /, *, model: str | None = None,
                       **fields: Any) -> GenerationResult:
        """Run one request to the end over the mesh (with failover) and return the whole result."""
        texts: list[str] = []
        ids: list[int] = []
        last: TokenChunk | None = None
        async for chunk in self.stream(request, model=model, **fields):
            texts.append(chunk.text)
            ids.extend(chunk.token_ids)
            last = chunk
        assert last is not None and last.finish_reason is not None and last.usage is not None
        return GenerationResult(text="".join(texts), token_ids=ids, finish_reason=last.finish_reason, usage=last.usage)

    async def stream(self, request: GenerationRequest | None = None, /, *, model: str | None = None,
                     **fields: Any) -> AsyncIterator[TokenChunk]:
        """Yield ``TokenChunk`` s from the best node, failing over mid-stream; raises ``MeshError`` s."""
        req = _as_request(request, fields)
        name = self._model_for(req, model)
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.counters["requests"] += 1
        progress = _Progress(prompt_ids=list(req.prompt_token_ids) if req.prompt_token_ids is not None else None)
        prompt_len = len(progress.prompt_ids) if progress.prompt_ids is not None else None
        tried: set[str] = set()
        failures: list[tuple[str, str, str]] = []  # (node, reason, message)
        version: str | None = None
        for _attempt in range(self.config.max_attempts):
            node = self._choose(name, tried, version)
            if node is None:
                break
            tried.add(node.node_id)
            version = version or str(node.metadata.get("version") or "") or None
            if progress.generated:
                if progress.prompt_ids is None:  # the node never sent the prompt's ids: cannot resume
                    self.counters["errors"] += 1
                    raise NoNode(f"cannot resume {name!r}: the failed node sent no prompt token ids")
                remaining = req.max_new_tokens - len(progress.generated)
                if remaining <= 0:
                    yield TokenChunk(text="", token_ids=[], finish_reason="length",
                                     usage=_usage(prompt_len, progress, started, None))
                    return
                body = request_body(req, model=name, prompt_token_ids=progress.prompt_ids + progress.generated,
                                    held=progress.held, max_new_tokens=remaining)
                progress.failovers += 1
                self.counters["failovers"] += 1
                log.info("resuming on %s after %d tokens", node.node_id, len(progress.generated))
            else:
                body = request_body(req, model=name)
            obs = self._observed.setdefault(node.node_id, _Observed())
            watch = _Watch()
            watchers = self._watchers.setdefault(node.node_id, set())
            watchers.add(watch)
            replies = self.client.stream(mesh_topics.inference_requests(node.node_id), body, type=GENERATE,
                                         encrypt_to=node.did, idle_timeout=1e9)
            obs.inflight += 1
            sent = loop.time()
            first_at: float | None = None
            last_at = sent
            n_tokens = 0
            failure: tuple[str, str] | None = None
            try:
                while failure is None:
                    if watch.dead:  # the death advert came while the caller held a chunk
                        failure = ("node_lost", f"{node.node_id} left the mesh")
                        break
                    wait = self.config.stall_timeout if first_at is not None else self.config.first_token_timeout
                    try:
                        async with asyncio.timeout(wait) as watch.timeout:
                            msg = await replies.__anext__()
                    except TimeoutError:
                        if watch.dead:
                            failure = ("node_lost", f"{node.node_id} left the mesh")
                        else:
                            failure = ("timeout", f"no token from {node.node_id} within {wait}s")
                        break
                    except StopAsyncIteration:
                        failure = ("protocol_error", f"{node.node_id} ended the stream without a finish reason")
                        break
                    except MessagingError as exc:
                        failure = _classify(exc)
                        if failure[0] in _REQUEST_REASONS:
                            obs.outcome(True)
                            self.counters["errors"] += 1
                            raise NodeRequestError(failure[1], reason=failure[0]) from None
                        break
                    except Exception as exc:  # noqa: BLE001 - any other failure of this node: fail over
                        failure = _classify(exc)
                        break
                    finally:
                        watch.timeout = None
                    chunk = _parse_chunk(msg)
                    if chunk is None:
                        failure = ("protocol_error", f"malformed chunk from {node.node_id}")
                        break
                    text, ids, finish, usage, prompt_ids = chunk
                    now = loop.time()
                    if first_at is None:
                        first_at = now
                        obs.ttft_s = _ewma(obs.ttft_s, now - sent)
                    if prompt_ids is not None and progress.prompt_ids is None:
                        progress.prompt_ids = prompt_ids
                        prompt_len = len(prompt_ids)
                    if ids and progress.first_token_at is None:
                        progress.first_token_at = now
                    progress.generated.extend(ids)
                    progress.held = 0 if text else progress.held + len(ids)
                    n_tokens += len(ids)
                    last_at = now
                    if finish is not None:
                        obs.outcome(True)
                        if n_tokens > 1 and last_at > first_at:
                            obs.tokens_per_s = _ewma(obs.tokens_per_s, (n_tokens - 1) / (last_at - first_at))
                        self.counters["completed"] += 1
                        yield TokenChunk(text=text, token_ids=ids, finish_reason=finish,
                                         usage=_usage(prompt_len, progress, started, usage))
                        # read the node's stream.end so closing the reply stream sends no cancel
                        with contextlib.suppress(Exception):
                            async with asyncio.timeout(self.config.stall_timeout):
                                await anext(replies, None)
                        return
                    yield TokenChunk(text=text, token_ids=ids)
            finally:
                watchers.discard(watch)
                if not watchers:
                    self._watchers.pop(node.node_id, None)
                obs.inflight -= 1
                with contextlib.suppress(Exception):
                    await replies.aclose()  # sends cancel to the node unless the stream had ended
            reason, message = failure
            if reason not in PERMISSION_REASONS and reason not in BUSY_REASONS and reason != "model_not_found":
                obs.outcome(False)
            if reason == "node_lost":
                self.table.mark_dead(node.node_id)
            failures.append((node.node_id, reason, message))
            self.failures[reason] += 1
            log.warning("node %s failed (%s): %s", node.node_id, reason, message)
        self.counters["errors"] += 1
        raise _exhausted(name, failures, tried)

    def _choose(self, model: str, tried: set[str], version: str | None) -> NodeAdvert | None:
        live = [a for a in self.table.live(model) if a.node_id not in tried]
        if len(live) == 1:  # nothing to rank (the common single-node path: no z-scores per request)
            return live[0]
        ranked = self.ranked(model, exclude=tried)
        if version is not None:  # a resumed stream continues on the same weights where possible
            same = [v for v in ranked if str(v.advert.metadata.get("version") or "") == version]
            ranked = same or ranked
        return ranked[0].advert if ranked else None

    # ------------------------------------------------------------------ GenerationBackend

    def models(self) -> list[dict[str, Any]]:
        """One metadata document per model some live node serves (from its best-ranked node)."""
        docs: dict[str, dict[str, Any]] = {}
        for view in self.ranked():
            for name in view.advert.models:
                if name not in docs:
                    docs[name] = {**dict(view.advert.metadata), "name": name}
        return list(docs.values())

    def stats(self) -> dict[str, Any]:
        """Router counters and the mesh's aggregate load."""
        live = self.table.live()
        return {
            **self.counters,
            "nodes": len(live),
            "inflight": sum(o.inflight for o in self._observed.values()),
            "queue_depth": sum(a.load.queue_depth for a in live),
            "active_streams": sum(a.load.active_streams for a in live),
            "tokens_per_s": sum(a.load.tokens_per_s for a in live),
        }


def _as_request(request: GenerationRequest | None, fields: dict[str, Any]) -> GenerationRequest:
    if request is None:
        return GenerationRequest(**fields)
    if fields:
        raise TypeError("give a GenerationRequest or its fields as keywords, not both")
    if not isinstance(request, GenerationRequest):
        raise TypeError(f"expected a GenerationRequest, got {type(request).__name__}")
    return request


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - _EWMA) * old + _EWMA * new


def _classify(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, RemoteError):
        return exc.reason, str(exc)
    if isinstance(exc, MessagingError):
        return ("timeout" if exc.reason == "timeout" else exc.reason), str(exc)
    return "node_error", f"{type(exc).__name__}: {exc}"


def _parse_chunk(msg: Message) -> tuple[str, list[int], Any, Any, list[int] | None] | None:
    body = msg.body
    if not isinstance(body, dict):
        return None
    text, ids = body.get("t"), body.get("ids")
    if not isinstance(text, str) or not isinstance(ids, list) or not all(type(t) is int for t in ids):
        return None
    finish = body.get("f")
    if finish is not None and finish not in ("stop", "length", "cancelled"):
        return None
    prompt = body.get("p")
    if prompt is not None and (not isinstance(prompt, list) or not all(type(t) is int for t in prompt)):
        return None
    return text, ids, finish, body.get("u"), prompt


def _usage(prompt_len: int | None, progress: _Progress, started: float, node_usage: Any) -> Usage:
    u = node_usage if isinstance(node_usage, dict) else {}
    ttft = (progress.first_token_at - started) if progress.first_token_at is not None else 0.0
    cached = int(u.get("cached_prompt_tokens", 0) or 0) if progress.failovers == 0 else 0
    return Usage(
        prompt_tokens=prompt_len if prompt_len is not None else int(u.get("prompt_tokens", 0) or 0),
        completion_tokens=len(progress.generated),
        time_to_first_token_s=ttft,
        tokens_per_s=float(u.get("tokens_per_s", 0.0) or 0.0),
        cached_prompt_tokens=cached,
    )


def _exhausted(model: str, failures: list[tuple[str, str, str]], tried: set[str]) -> MeshError:
    if not failures:
        return NoNode(f"no live node serves {model!r}")
    reasons = [r for _, r, _ in failures]
    detail = "; ".join(f"{n}: {r}" for n, r, _ in failures)
    permission = [r for r in reasons if r in PERMISSION_REASONS]
    if permission and all(r in PERMISSION_REASONS or r in BUSY_REASONS for r in reasons):
        return NotPermitted(f"not permitted to use {model!r} ({detail})", node_reason=permission[0])
    if all(r in BUSY_REASONS for r in reasons):
        return MeshOverloaded(f"every node for {model!r} is busy ({detail})")
    if reasons[-1] == "timeout":
        return MeshTimeout(f"no node for {model!r} answered in time ({detail})")
    if permission:
        return NotPermitted(f"not permitted to use {model!r} ({detail})", node_reason=permission[0])
    return NoNode(f"no node left for {model!r} ({detail})")


__all__ = ["Mesh", "RouterConfig", "NodeView"]
