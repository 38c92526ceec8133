"""``Mesh``: the router any permitted peer runs to use the mesh's nodes.

    async with Mesh("mqtt://127.0.0.1:1883", key, credentials=[access_vc],
                    node_policy=NodePolicy.trusting(node_issuer_did)) as mesh:
        await mesh.wait_for_nodes(model="SmolLM2-135M-Instruct")
        result = await mesh.generate(prompt="Hi", max_new_tokens=16, temperature=0.0)
        async for chunk in mesh.stream(GenerationRequest(...), model="SmolLM2-135M-Instruct"): ...

Nodes are discovered from their signed adverts; only nodes whose ``InferenceNodeCredential``
verifies under the router's node trust policy (:class:`~sdk.mesh.NodePolicy`: trusted issuer,
not revoked, covering the advertised models and bound to the node id) are used, and a node
whose credential is revoked is dropped the moment the new status list arrives. They are ranked (``rank_nodes``: advertised throughput
and load, the router's own in-flight count, observed errors and time to first token) and the
best is asked. If it dies (its death advert / MQTT will arrives) or stalls past a timeout, the
stream continues on the next node from the prompt's token ids plus the tokens already received,
so the caller sees one uninterrupted stream. Leaving the stream early cancels the node's work.
Nodes that advertise their capacity are chosen by the estimated time to completion
(``sdk.mesh.capacity.estimate``: queue, streams, prefill of the uncached prompt, decode rate);
a node holding the longest matching prompt prefix (its advertised summary, or where this router
sent the conversation before) keeps the request while its estimate is within
``affinity_slack`` of the best. A routing policy (``sdk.mesh.routing_policy``) from a trusted
operator can send a share of a model's traffic to the nodes of one version (gray release).
A request that needs a feature (``response_format``: ``json_schema`` / ``json_object``; ``tools``)
goes only to nodes whose advert lists it, failovers included; when live nodes serve the model but
none lists it, :class:`~sdk.mesh.errors.NoCapableNode` is raised at once (no node is asked).
The router is also a ``GenerationBackend`` (``stream``/``generate``/``models``/``stats``), so the
OpenAI HTTP app serves it unchanged (see ``sdk.mesh.gateway``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from sdk.identity import Key, TrustPolicy
from sdk.inference.types import GenerationRequest, GenerationResult, TokenChunk, Usage
from sdk.mesh import topics as mesh_topics
from sdk.mesh.adverts import AdvertTable, NodeAdvert, request_features, supports
from sdk.mesh.capacity import Estimate, estimate
from sdk.mesh.credentials import NodePolicy
from sdk.mesh.errors import (
    BUSY_REASONS,
    PERMISSION_REASONS,
    MeshError,
    MeshOverloaded,
    MeshTimeout,
    NoCapableNode,
    NodeRequestError,
    NoNode,
    NoNodeTrust,
    NotPermitted,
)
from sdk.mesh.prefixes import DEFAULT_BLOCK, AffinityMap, PrefixHasher, continuation, prompt_bytes
from sdk.mesh.protocol import ADVERT, GENERATE, Chunk, parse_chunk, request_body
from sdk.mesh.ranking import NodeFigures, RankedNode, RankingWeights, rank_nodes
from sdk.mesh.routing_policy import ALL_POLICIES, PolicyBook, policy_requirement, policy_version
from sdk.messaging import topics
from sdk.messaging.client import ClientConfig, SecureClient
from sdk.messaging.envelope import Message
from sdk.messaging.errors import MessagingError, NotAuthorized, RejectedMessage, RemoteError
from sdk.messaging.policy import Retained

log = logging.getLogger(__name__)

#: Node reasons that mean "this request is wrong", not "this node is wrong": no retry elsewhere.
_REQUEST_REASONS = frozenset({"invalid_request", "prompt_too_long", "invalid_schema", "unsupported_schema",
                              "schema_too_large"})
_EWMA = 0.3


@dataclass(frozen=True)
class RouterConfig:
    """Timeouts (seconds), failover budget and ranking weights."""

    first_token_timeout: float = 30.0  # queueing + prefill on the chosen node
    stall_timeout: float = 5.0  # gap between tokens before failing over
    max_attempts: int = 4  # nodes tried for one request (first choice + failovers)
    weights: RankingWeights = RankingWeights()
    stale_after: float = 3.0  # adverts older than this many intervals are ignored
    affinity: bool = True  # keep a request on the node holding its longest prompt prefix
    affinity_slack: float = 1.0  # ... while that node's estimate is within (1 + slack) x the best
    prefix_key: bytes | None = None  # the mesh's prefix key (as the nodes'): match their summaries
    prefix_block: int = DEFAULT_BLOCK
    seed: int | None = None  # the gray-release RNG for requests without a request_id

    def __post_init__(self) -> None:
        if not (self.first_token_timeout > 0 and self.stall_timeout > 0 and self.max_attempts >= 1):
            raise ValueError("timeouts must be > 0 and max_attempts >= 1")
        if not 0 <= self.affinity_slack <= 100:
            raise ValueError("affinity_slack must be in [0, 100]")


#: The request ``autoglm nodes`` estimates for (prompt tokens, new tokens).
NOMINAL_REQUEST = (256, 128)
_BYTES_PER_TOKEN = 4  # prefix blocks are bytes; the router has no tokenizer


class _Route:
    """What the choice of node needs to know about one request (the prefix chain is hashed only
    when several nodes are candidates)."""

    def __init__(self, hasher: PrefixHasher | None = None, data: bytes = b"", *,
                 prompt_tokens: int = NOMINAL_REQUEST[0], max_new_tokens: int = NOMINAL_REQUEST[1]) -> None:
        self._hasher, self._data = hasher, data
        self.prompt_tokens, self.max_new_tokens = prompt_tokens, max_new_tokens

    @functools.cached_property
    def chain(self) -> tuple[bytes, ...]:
        return tuple(self._hasher.chain(self._data)) if self._hasher is not None else ()


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
    started: float
    prompt_len: int | None = None
    generated: list[int] = field(default_factory=list)
    held: int = 0  # trailing generated tokens whose text has not been emitted
    first_token_at: float | None = None
    failovers: int = 0

    def take(self, chunk: Chunk, now: float) -> None:
        """Account for one chunk from the node serving the stream now."""
        if chunk.prompt_ids is not None and self.prompt_ids is None:
            self.prompt_ids = chunk.prompt_ids
            self.prompt_len = len(chunk.prompt_ids)
        if chunk.ids and self.first_token_at is None:
            self.first_token_at = now
        self.generated.extend(chunk.ids)
        self.held = 0 if chunk.text else self.held + len(chunk.ids)


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
    estimate: Estimate | None = None  # for the request being routed (a nominal one when listing)
    prefix_blocks: int = 0  # leading prompt blocks this node holds

    @property
    def cost(self) -> float:
        """Estimated seconds to completion, inflated by the node's observed error rate."""
        if self.estimate is None:
            return float("inf")
        return self.estimate.total_s * (1.0 + 4.0 * self.figures.error_rate)


@dataclass
class _Attempt:
    """How one node attempt ended: ``done`` (the stream finished) or ``failure`` (reason, message)."""

    done: bool = False
    failure: tuple[str, str] = ("protocol_error", "the attempt ended without a result")


class Mesh:
    """Routes generation requests over the mesh as one permitted peer (``async with``).

    ``node_policy``: which nodes to use (a :class:`NodePolicy`, or a ``TrustPolicy`` naming the
    issuers trusted for ``InferenceNodeCredential``). Without one the constructor raises
    :class:`NoNodeTrust`, unless ``require_node_credential=False`` (tests, development: any node
    with a well-signed advert is used).
    """

    def __init__(
        self,
        broker: Any,
        key: Key,
        *,
        credentials: list[Any] | tuple[Any, ...] = (),
        node_policy: NodePolicy | TrustPolicy | None = None,
        require_node_credential: bool = True,
        config: RouterConfig = RouterConfig(),
        client_config: ClientConfig | None = None,
        resolver: Any = None,
        default_model: str | None = None,
        policy_trust: TrustPolicy | None = None,
        **transport_options: Any,
    ) -> None:
        if isinstance(node_policy, TrustPolicy):
            node_policy = NodePolicy(node_policy, resolver=resolver)
        if node_policy is None and require_node_credential:
            raise NoNodeTrust("a router needs node_policy= (the issuers trusted for InferenceNodeCredential); "
                              "pass require_node_credential=False only for tests and development")
        if node_policy is not None and not isinstance(node_policy, NodePolicy):
            raise TypeError("node_policy must be a NodePolicy or a TrustPolicy")
        self.key = key
        self.did = key.did
        self.config = config
        self.default_model = default_model
        self.node_policy = node_policy
        client_config = client_config or ClientConfig()
        self.client = SecureClient(broker, key, config=client_config, credentials=credentials, resolver=resolver,
                                   on_reject=self._on_reject, **transport_options)
        self.table = AdvertTable(stale_after=config.stale_after)
        self._admitted: dict[str, Message] = {}  # node id -> the advert that admitted it (re-checked on revocation)
        self._observed: dict[str, _Observed] = {}
        self._watchers: dict[str, set[_Watch]] = {}
        self._changed = asyncio.Event()
        self.hasher = PrefixHasher(config.prefix_key, block=config.prefix_block)
        self.affinity = AffinityMap()
        self.policy_trust = policy_trust
        self.policies = PolicyBook(seed=config.seed)
        self.by_version: Counter[str] = Counter()  # first choices per model version (gray release)
        self.counters: dict[str, int] = {"requests": 0, "completed": 0, "failovers": 0, "errors": 0,
                                         "adverts": 0, "adverts_rejected": 0, "nodes_revoked": 0,
                                         "affinity_kept": 0, "policies": 0, "policies_rejected": 0,
                                         "policies_ignored": 0, "policy_fallbacks": 0, "no_capable_node": 0}
        self.failures: Counter[str] = Counter()  # per node attempt that did not finish, by reason
        if node_policy is not None:
            node_policy.status.add_listener(self._on_status_list)

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Mesh:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Connect, follow status lists and subscribe to node adverts (retained ones arrive at once)."""
        await self.client.connect()
        if self.node_policy is not None and not await self.node_policy.status.attach(self.client):
            log.warning("router cannot follow status lists: node revocations arrive only on recheck")
        await self.client.subscribe(
            mesh_topics.ALL_INFERENCE_ADS, self._on_advert, qos=1,
            require=self.node_policy.requirement if self.node_policy is not None else None,
            retained=Retained.STATE, order=_advert_version,
        )
        if self.policy_trust is not None:
            options = {"status": self.node_policy.status.checker} if self.node_policy is not None else {}
            await self.client.subscribe(ALL_POLICIES, self._on_policy, qos=1,
                                        require=policy_requirement(self.policy_trust, verify_options=options),
                                        retained=Retained.STATE, order=policy_version)

    async def aclose(self) -> None:
        """Disconnect (streams in progress fail)."""
        await self.client.aclose()

    # ------------------------------------------------------------------ discovery

    def _on_reject(self, topic: str, exc: RejectedMessage) -> None:
        if topics.matches(mesh_topics.ALL_INFERENCE_ADS, topic):
            self.counters["adverts_rejected"] += 1
        elif topics.matches(ALL_POLICIES, topic):
            self.counters["policies_rejected"] += 1
            log.warning("rejected routing policy on %r: %s", topic, exc)

    def _on_policy(self, msg: Message) -> None:
        """A verified routing policy from a permitted operator (newest ``seq`` per model wins)."""
        before = self.policies.rejected
        if self.policies.offer(msg):
            self.counters["policies"] += 1
        elif self.policies.rejected > before:
            self.counters["policies_rejected"] += 1
        else:
            self.counters["policies_ignored"] += 1

    def _on_advert(self, msg: Message) -> None:
        """A verified advert: signer, topic and credential checked, newer than the sender's last."""
        try:  # type, signer and topic were checked by _advert_version
            advert = NodeAdvert.from_body(msg.body)
        except ValueError as exc:
            self.counters["adverts_rejected"] += 1
            log.warning("rejected advert on %r from %s: %s", msg.topic, msg.sender, exc)
            return
        # a retained copy of a node that died without its will (lost by a broker restart) is ignored
        # once older than the staleness window plus the clock skew allowed between hosts
        too_old = self.config.stale_after * advert.interval_s + self.client.config.policy.clock_skew
        if msg.retained and advert.online and time.time() - msg.issued_at > too_old:
            log.debug("ignoring a stale retained advert of %s", advert.node_id)
            return
        self.counters["adverts"] += 1
        held = self.table.get(advert.node_id)
        if not self.table.apply(advert):
            if held is not None and held.did != advert.did:
                self.counters["adverts_rejected"] += 1
                log.warning("ignoring advert for node %r from %s: the id is held by %s", advert.node_id,
                            advert.did, held.did)
            return
        if not advert.online:
            log.info("node %s left the mesh", advert.node_id)
            self._drop(advert.node_id, mark=False)
        else:
            self._admitted[advert.node_id] = msg
        self._changed.set()

    def _drop(self, node_id: str, *, mark: bool = True) -> None:
        """Forget a node and end the waits of streams on it (they fail over)."""
        if mark:
            self.table.mark_dead(node_id)
        self._admitted.pop(node_id, None)
        self.affinity.forget(node_id)
        for watch in self._watchers.get(node_id, ()):
            watch.kill()

    def _on_status_list(self, url: str) -> None:
        """A new status list: drop cached grants, then every node whose credential no longer holds."""
        assert self.node_policy is not None
        self.client.authorizer.status_changed(url)
        for node_id, msg in list(self._admitted.items()):
            try:
                self.client.authorizer.authorize(msg, self.node_policy.requirement)
            except NotAuthorized as exc:
                self.counters["nodes_revoked"] += 1
                log.warning("node %s (%s) dropped: its credential no longer holds: %s", node_id, msg.sender, exc)
                self._drop(node_id)
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

    def _prefix_blocks(self, advert: NodeAdvert, route: _Route) -> int:
        """Leading blocks of the request's prompt the node holds (its summary, or this router's record)."""
        if not route.chain:
            return 0
        held = self.affinity.depth(route.chain, advert.node_id)
        summary = advert.prefixes
        if summary is not None and self.hasher.keyed and summary.block == self.hasher.block:
            held = max(held, summary.depth(route.chain))
        return held

    def _estimate(self, advert: NodeAdvert, route: _Route, blocks: int) -> Estimate | None:
        if advert.capacity is None:
            return None
        obs = self._observed.get(advert.node_id)
        cached = min(blocks * self.hasher.block // _BYTES_PER_TOKEN, route.prompt_tokens)
        return estimate(advert.capacity, queue_depth=advert.load.queue_depth,
                        active_streams=advert.load.active_streams, inflight=obs.inflight if obs else 0,
                        prompt_tokens=route.prompt_tokens, cached_tokens=cached, max_new_tokens=route.max_new_tokens)

    def ranked(self, model: str | None = None, *, exclude: frozenset[str] | set[str] = frozenset(),
               nodes: list[NodeAdvert] | None = None, route: _Route | None = None) -> list[NodeView]:
        """Live nodes (for ``model``) best first, with the score's parts; by estimated time to
        completion when every one advertises its capacity, else by the composite score."""
        route = route or _Route()
        pool = nodes if nodes is not None else self.table.live(model)
        adverts = {a.node_id: a for a in pool if a.node_id not in exclude}
        figures = {nid: self._figures(a) for nid, a in adverts.items()}
        ranks = rank_nodes(list(figures.values()), self.config.weights)
        views = []
        for r in ranks:
            advert = adverts[r.node_id]
            blocks = self._prefix_blocks(advert, route)
            views.append(NodeView(advert, r, figures[r.node_id], self._estimate(advert, route, blocks), blocks))
        if views and all(v.estimate is not None for v in views):
            views.sort(key=lambda v: (v.cost, -v.rank.score, v.advert.node_id))
        return views

    def _route(self, req: GenerationRequest) -> _Route:
        data = prompt_bytes(prompt=req.prompt, messages=req.messages, prompt_token_ids=req.prompt_token_ids)
        tokens = len(req.prompt_token_ids) if req.prompt_token_ids is not None else max(len(data) // _BYTES_PER_TOKEN, 1)
        return _Route(self.hasher, data, prompt_tokens=tokens, max_new_tokens=req.max_new_tokens)

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
        """Yield ``TokenChunk`` s from the best node, failing over mid-stream; raises ``MeshError`` s
        (and ``InvalidRequest`` for a request no node could take, before any is asked)."""
        req = _as_request(request, fields).validate()
        name = self._model_for(req, model)
        self.counters["requests"] += 1
        prompt_ids = list(req.prompt_token_ids) if req.prompt_token_ids is not None else None
        progress = _Progress(prompt_ids=prompt_ids, started=asyncio.get_running_loop().time(),
                             prompt_len=len(prompt_ids) if prompt_ids is not None else None)
        tried: set[str] = set()
        failures: list[tuple[str, str, str]] = []  # (node, reason, message)
        version: str | None = None
        route = self._route(req)
        split = self.policies.versions_for(name, req.request_id)
        needs = request_features(req)
        texts: list[str] = []
        for _ in range(self.config.max_attempts):
            node = self._choose(name, tried, version, route, split if not tried else None, needs)
            if node is None:
                if needs:
                    self._no_capable(name, needs, failures, tried)
                break
            if not tried:
                self.by_version[str(node.metadata.get("version") or "")] += 1
            tried.add(node.node_id)
            version = version or str(node.metadata.get("version") or "") or None
            if progress.generated:
                if progress.prompt_ids is None:  # the node never sent the prompt's ids: cannot resume
                    self.counters["errors"] += 1
                    raise NoNode(f"cannot resume {name!r}: the failed node sent no prompt token ids")
                remaining = req.max_new_tokens - len(progress.generated)
                if remaining <= 0:
                    yield TokenChunk(text="", token_ids=[], finish_reason="length", usage=_usage(progress, None))
                    return
                body = request_body(req, model=name, prompt_token_ids=progress.prompt_ids + progress.generated,
                                    held=progress.held, max_new_tokens=remaining,
                                    generated=len(progress.generated))  # a constrained resume
                progress.failovers += 1
                self.counters["failovers"] += 1
                log.info("resuming on %s after %d tokens", node.node_id, len(progress.generated))
            else:
                body = request_body(req, model=name)
            result = _Attempt()
            chunks = self._attempt(node, body, progress, result)
            try:
                async for chunk in chunks:
                    texts.append(chunk.text)
                    yield chunk
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]  # the caller left: cancel on the node
            if result.done:
                if req.prompt_token_ids is None:  # the node now holds the prompt and the reply
                    base = prompt_bytes(prompt=req.prompt, messages=req.messages)
                    self.affinity.record(self.hasher.chain(continuation(base, "".join(texts))), node.node_id)
                else:
                    self.affinity.record(route.chain, node.node_id)
                return
            reason, message = result.failure
            if reason == "stream_gap":  # the node is alive; chunks were lost on the way: resume there too
                tried.discard(node.node_id)
            failures.append((node.node_id, reason, message))
            self.failures[reason] += 1
            log.warning("node %s failed (%s): %s", node.node_id, reason, message)
        self.counters["errors"] += 1
        raise _exhausted(name, failures, tried)

    async def _attempt(self, node: NodeAdvert, body: dict[str, Any], progress: _Progress,
                       result: _Attempt) -> AsyncIterator[TokenChunk]:
        """One node's part of a stream: yield its chunks; set ``result`` (done, or why it failed).

        The client's stream bounds the wait for the first token (``first_token_timeout``) and each
        gap after it (``stall_timeout``); the node's death advert ends the wait at once.
        """
        loop = asyncio.get_running_loop()
        obs = self._observed.setdefault(node.node_id, _Observed())
        watch = _Watch()
        watchers = self._watchers.setdefault(node.node_id, set())
        watchers.add(watch)
        replies = self.client.stream(mesh_topics.inference_requests(node.node_id), body, type=GENERATE,
                                     encrypt_to=node.did, first_timeout=self.config.first_token_timeout,
                                     idle_timeout=self.config.stall_timeout)
        obs.inflight += 1
        sent = loop.time()
        first_at: float | None = None
        n_tokens = 0
        try:
            while True:
                if watch.dead:  # the death advert came while the caller held a chunk
                    result.failure = ("node_lost", f"{node.node_id} left the mesh")
                    break
                try:
                    async with asyncio.timeout(None) as watch.timeout:  # a death advert reschedules it
                        msg = await replies.__anext__()
                except TimeoutError:
                    result.failure = ("node_lost", f"{node.node_id} left the mesh")
                    break
                except StopAsyncIteration:
                    result.failure = ("protocol_error", f"{node.node_id} ended the stream without a finish reason")
                    break
                except MessagingError as exc:
                    result.failure = _classify(exc)
                    if result.failure[0] in _REQUEST_REASONS:
                        obs.outcome(True)
                        self.counters["errors"] += 1
                        raise NodeRequestError(result.failure[1], reason=result.failure[0]) from None
                    break
                except Exception as exc:  # noqa: BLE001 - any other failure of this node: fail over
                    result.failure = _classify(exc)
                    break
                finally:
                    watch.timeout = None
                chunk = parse_chunk(msg.body)
                if chunk is None:
                    result.failure = ("protocol_error", f"malformed chunk from {node.node_id}")
                    break
                now = loop.time()
                if first_at is None:
                    first_at = now
                    obs.ttft_s = _ewma(obs.ttft_s, now - sent)
                progress.take(chunk, now)
                n_tokens += len(chunk.ids)
                if chunk.finish is not None:
                    obs.outcome(True)
                    if n_tokens > 1 and now > first_at:
                        obs.tokens_per_s = _ewma(obs.tokens_per_s, (n_tokens - 1) / (now - first_at))
                    self.counters["completed"] += 1
                    result.done = True
                    yield TokenChunk(text=chunk.text, token_ids=chunk.ids, finish_reason=chunk.finish,
                                     usage=_usage(progress, chunk.usage))
                    # read the node's stream.end so closing the reply stream sends no cancel
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(self.config.stall_timeout):
                            await anext(replies, None)
                    return
                yield TokenChunk(text=chunk.text, token_ids=chunk.ids)
        finally:
            watchers.discard(watch)
            if not watchers:
                self._watchers.pop(node.node_id, None)
            obs.inflight -= 1
            with contextlib.suppress(Exception):
                await replies.aclose()  # sends cancel to the node unless the stream had ended
        reason = result.failure[0]
        if reason not in PERMISSION_REASONS and reason not in BUSY_REASONS and reason != "model_not_found":
            obs.outcome(False)
        if reason == "node_lost":
            self._drop(node.node_id)

    def _choose(self, model: str, tried: set[str], version: str | None, route: _Route | None = None,
                split: tuple[str | None, frozenset[str]] | None = None,
                needs: frozenset[str] = frozenset()) -> NodeAdvert | None:
        while True:
            node = self._best(model, tried, version, route or _Route(), split, needs)
            if node is None or self._still_trusted(node):
                return node

    def _no_capable(self, model: str, needs: frozenset[str], failures: list[tuple[str, str, str]],
                    tried: set[str]) -> None:
        """Raise :class:`NoCapableNode` when untried live nodes serve ``model`` but none lists
        ``needs`` (unless the capable nodes' failures say more: every one busy or refusing)."""
        without = [a.node_id for a in self.table.live(model) if a.node_id not in tried and not supports(a, needs)]
        if not without or (failures and type(_exhausted(model, failures, tried)) is not NoNode):
            return
        wanted = ", ".join(sorted(needs))
        message = (f"no live node for {model!r} advertises {wanted} ({len(without)} node(s) serve it without)"
                   if not failures else f"no other node for {model!r} advertises {wanted} ("
                   + "; ".join(f"{n}: {r}" for n, r, _ in failures) + ")")
        self.counters["errors"] += 1
        self.counters["no_capable_node"] += 1
        log.warning("request for %r not routed: %s", model, message)
        raise NoCapableNode(message, needs=needs)

    def _best(self, model: str, tried: set[str], version: str | None, route: _Route,
              split: tuple[str | None, frozenset[str]] | None, needs: frozenset[str] = frozenset()) -> NodeAdvert | None:
        live = [a for a in self.table.live(model) if a.node_id not in tried]
        if needs:  # constrained output / tools: only nodes that advertise them
            live = [a for a in live if supports(a, needs)]
        if split is not None:  # gray release: this request's share of the model's versions
            chosen, listed = split
            group = [a for a in live if (_version(a) == chosen if chosen is not None else _version(a) not in listed)]
            if not group and live:
                self.counters["policy_fallbacks"] += 1
                log.info("no live node of the policy's version %r for %r: routing on load", chosen, model)
            live = group or live
        if version is not None:  # a resumed stream continues on the same weights where possible
            live = [a for a in live if _version(a) == version] or live
        if len(live) == 1:  # nothing to rank (the common single-node path: no z-scores per request)
            return live[0]
        ranked = self.ranked(model, nodes=live, route=route)
        if not ranked:
            return None
        best = ranked[0]
        if self.config.affinity and route.chain:
            holder = _affine(ranked)
            if holder is not None and holder is not best and self._keeps(holder, best):
                self.counters["affinity_kept"] += 1
                return holder.advert
        return best.advert

    def _keeps(self, holder: NodeView, best: NodeView) -> bool:
        """Whether the node holding the prefix stays the choice against the best by load and speed."""
        if holder.estimate is not None and best.estimate is not None:
            return holder.cost <= best.cost * (1.0 + self.config.affinity_slack) + 0.05
        return holder.figures.load < 1.0 and holder.figures.error_rate < 0.5

    def _still_trusted(self, node: NodeAdvert) -> bool:
        """The node's credential grant still holds (a cache hit; it lapses when the credential
        expires): else the node is dropped before any prompt goes to it."""
        if self.node_policy is None:
            return True
        msg = self._admitted.get(node.node_id)
        try:
            if msg is None:
                raise NotAuthorized(f"no admitting advert held for {node.node_id}")
            self.client.authorizer.authorize(msg, self.node_policy.requirement)
        except NotAuthorized as exc:
            log.warning("node %s dropped before routing: %s", node.node_id, exc)
            self._drop(node.node_id)
            return False
        return True

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


def _version(advert: NodeAdvert) -> str:
    return str(advert.metadata.get("version") or "")


def _affine(ranked: list[NodeView]) -> NodeView | None:
    """The one node holding strictly more of the prompt's prefix than every other (None: a tie)."""
    top = max(ranked, key=lambda v: v.prefix_blocks)
    if top.prefix_blocks == 0 or sum(1 for v in ranked if v.prefix_blocks == top.prefix_blocks) > 1:
        return None
    return top


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


def _advert_version(msg: Message) -> tuple[str, tuple[float, int]] | None:
    """Adverts are state: per node id, ordered by the signed body's ``(epoch, seq)``. None (the
    client rejects it as malformed, before it can raise any floor) for another type, a body
    whose DID is not the signer's or whose node id is not the topic's."""
    body = msg.body
    if msg.type != ADVERT or not isinstance(body, dict):
        log.info("advert on %r from %s: type %r, body %s", msg.topic, msg.sender, msg.type, type(body).__name__)
        return None
    node, epoch, seq = body.get("node"), body.get("epoch"), body.get("seq")
    if not isinstance(node, str) or type(seq) is not int or type(epoch) not in (int, float):
        log.info("advert on %r from %s has no node / epoch / seq", msg.topic, msg.sender)
        return None
    if body.get("did") != msg.sender or msg.topic != mesh_topics.inference_ad(node):
        log.info("advert for node %r (DID %r) on %r is signed by %s", node, body.get("did"), msg.topic, msg.sender)
        return None
    return node, (float(epoch), seq)  # type: ignore[arg-type]  # checked int | float above


def _usage(progress: _Progress, node_usage: Any) -> Usage:
    u = node_usage if isinstance(node_usage, dict) else {}
    prompt_len = progress.prompt_len
    ttft = (progress.first_token_at - progress.started) if progress.first_token_at is not None else 0.0
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
