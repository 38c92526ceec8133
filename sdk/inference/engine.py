"""The inference engine: an asyncio facade over the continuous-batching scheduler.

    engine = await Engine.start(EngineConfig())          # load (bundled SmolLM2 by default), warm up
    engine = Engine.from_model(model, tokenizer, config)  # or wrap a model already loaded
    async for chunk in engine.stream(GenerationRequest(prompt="Hi", max_new_tokens=16)): ...
    result = await engine.generate(request)
    await engine.aclose()

Request errors (``InvalidRequest``, ``PromptTooLong``, ``EngineOverloaded``, ``EngineClosed``) are
raised by the first ``__anext__`` of ``stream()``, before any chunk, and by ``generate()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from .block_pool import BlockPool
from .detokenizer import IncrementalDetokenizer, StopMatcher
from .errors import InvalidConfig, InvalidRequest, PromptTooLong
from .kv_cache import PagedKVCache, install_paged_attention
from .sampling import SamplingParams, make_generator
from .scheduler import Scheduler, Sequence
from .types import EngineConfig, GenerationRequest, GenerationResult, TokenChunk

log = logging.getLogger(__name__)

__all__ = ["Engine"]


class Engine:
    """Continuous-batching generation over one causal LM; safe to share between asyncio tasks."""

    def __init__(
        self, model: Any, tokenizer: Any, config: EngineConfig, *, metadata: dict[str, Any] | None = None
    ) -> None:
        """Use :meth:`start` or :meth:`from_model`; this wires the parts but starts nothing."""
        from .placement import dtype_name, model_dims, plan_paged_kv

        self.config = config
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        dims = model_dims(model.config)
        per_token = PagedKVCache.bytes_per_token(
            layers=dims["layers"], kv_heads=dims["kv_heads"], head_dim=dims["head_dim"], dtype=self.dtype
        )
        budget = config.kv_memory
        if budget is None and config.kv_cache_tokens is not None:
            budget = config.kv_cache_tokens * per_token
        self.plan = plan_paged_kv(
            model.config, self.dtype, self.device,
            max_sequence_length=_sequence_length(config.max_sequence_length, dims["context_length"]),
            max_batch_size=config.max_batch_size,
            block_size=config.kv_block_size,
            gpu_memory_utilization=config.gpu_memory_utilization,
            budget_bytes=budget,
        )
        self.max_sequence_length = self.plan.max_sequence_length
        if not getattr(model, "native_paged", False):  # the native runtime attends through it already
            install_paged_attention(model)
        cache = PagedKVCache(
            layers=dims["layers"], kv_heads=dims["kv_heads"], head_dim=dims["head_dim"],
            block_size=self.plan.block_size, dtype=self.dtype, device=self.device,
        )
        pool = BlockPool(
            block_size=self.plan.block_size, max_blocks=self.plan.max_blocks, storage=cache,
            initial_blocks=self.plan.initial_blocks, grow_blocks=self.plan.grow_blocks,
            cache_blocks=config.prefix_cache_tokens // self.plan.block_size,
        )
        decoder = None
        if config.cuda_graphs:
            if self.device.type == "cuda":
                from .cuda_graphs import CudaGraphDecoder, compile_pointwise_modules

                compile_pointwise_modules(model)
                decoder = CudaGraphDecoder(
                    model, cache, max_batch_size=self.plan.max_batch_size,
                    max_blocks=-(-self.max_sequence_length // self.plan.block_size),
                )
            else:
                log.warning("cuda_graphs=True ignored on %s", self.device)
        self._scheduler = Scheduler(
            model, cache=cache, pool=pool, max_batch_size=self.plan.max_batch_size,
            max_sequence_length=self.max_sequence_length, max_queue_size=config.max_queue_size,
            prefill_chunk_size=config.prefill_chunk_size, prefix_caching=config.prefix_cache_tokens > 0,
            idle_shrink_s=config.kv_idle_shrink_s, min_blocks=self.plan.initial_blocks, decoder=decoder,
        )
        self._eos = _eos_ids(model, tokenizer)
        self._vocab = int(model.get_output_embeddings().weight.shape[0])
        self._by_request: dict[str, Sequence] = {}
        self._closed = False
        self._grammar: Any = None  # structured output: GrammarCompiler, made with the first constraint
        self._grammar_lock = asyncio.Lock()
        if metadata is not None:
            self._metadata = _with_serving(metadata, _serving(self))
        else:
            self._metadata = _metadata(self, dtype_name(self.dtype))
        self._scheduler.start()
        log.info(
            "engine ready on %s (%s): %d streams x %d tokens, paged KV %d-token blocks, %.0f of %.0f MiB "
            "allocated, prefix cache %d tokens, cuda_graphs=%s",
            self.device, dtype_name(self.dtype), self.plan.max_batch_size, self.max_sequence_length,
            self.plan.block_size, cache.nbytes / 2**20, self.plan.budget_bytes / 2**20,
            config.prefix_cache_tokens, decoder is not None,
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    async def start(cls, config: EngineConfig | None = None) -> Engine:
        """Load ``config.model_path`` (None: the bundled SmolLM2) on the chosen device, then warm up."""
        from .loader import load_model

        config = config or EngineConfig()
        loaded = await asyncio.to_thread(
            load_model, config.model_path, device=config.device, dtype=config.dtype,
            max_sequence_length=config.max_sequence_length, runtime=config.runtime,
        )
        engine = await asyncio.to_thread(
            lambda: cls(loaded.model, loaded.tokenizer, config, metadata=_loaded_metadata(loaded, config))
        )
        if config.warmup:
            await engine.warmup()
        return engine

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        config: EngineConfig | None = None,
        *,
        metadata: dict[str, Any] | None = None,
    ) -> Engine:
        """Wrap a loaded transformers causal LM (its attention is routed through the paged KV cache)."""
        return cls(model, tokenizer, config or EngineConfig(), metadata=metadata)

    async def warmup(self) -> float:
        """Capture CUDA graphs (if enabled) and run one short generation; return the seconds taken.

        Call it before serving: with ``cuda_graphs`` it compiles and captures every batch bucket.
        """
        started = time.perf_counter()
        decoder = self._scheduler.decoder
        if decoder is not None:
            graphs = await asyncio.to_thread(decoder.warmup)
            log.info("captured %d CUDA graphs in %.2f s", graphs, time.perf_counter() - started)
        await self.generate(GenerationRequest(prompt="Hello", max_new_tokens=4, temperature=0.0))
        seconds = time.perf_counter() - started
        log.info("warm-up took %.2f s", seconds)
        return seconds

    # ------------------------------------------------------------------ requests
    def encode(self, request: GenerationRequest) -> list[int]:
        """The prompt token ids of ``request`` (chat template applied for ``messages``).

        Validates ``request`` first (:meth:`GenerationRequest.validate`), then what needs the
        model: token ids inside the vocabulary, a chat template that applies, a non-empty prompt.
        """
        request.validate()
        if request.prompt_token_ids is not None:
            ids = list(request.prompt_token_ids)
            if not all(t < self._vocab for t in ids):
                raise InvalidRequest(f"prompt_token_ids must be integers in [0, {self._vocab})",
                                     field="prompt_token_ids")
        elif request.messages is not None:
            from .tools import render_chat

            try:
                text = render_chat(self.tokenizer, request.messages, request.tools)
            except Exception as exc:
                raise InvalidRequest(f"cannot apply the chat template: {exc}", field="messages") from exc
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(self.tokenizer(request.prompt)["input_ids"])
        if not ids:
            raise InvalidRequest("the prompt is empty", field="prompt")
        return ids

    def _prepare(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop) -> Sequence:
        if not isinstance(request, GenerationRequest):
            raise TypeError(f"expected a GenerationRequest, got {type(request).__name__}")
        ids = self.encode(request)  # validates the request
        room = self.max_sequence_length - len(ids)
        if room < 1:
            log.warning(
                "prompt of %d tokens does not fit max_sequence_length %d", len(ids), self.max_sequence_length
            )
            raise PromptTooLong(
                f"prompt has {len(ids)} tokens; max_sequence_length {self.max_sequence_length} "
                "leaves no room for output",
                prompt_tokens=len(ids), max_sequence_length=self.max_sequence_length,
            )
        params = SamplingParams(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k)
        return Sequence(
            prompt_ids=ids,
            max_new_tokens=min(request.max_new_tokens, room),  # clipped to what fits: finish "length"
            params=params,
            generator=None if params.greedy else make_generator(request.seed, self.device),
            detok=IncrementalDetokenizer(self.tokenizer, ids),
            stop=StopMatcher(list(request.stop)),
            eos_ids=self._eos,
            loop=loop,
            queue=asyncio.Queue(),
            request_id=request.request_id or uuid.uuid4().hex,
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TokenChunk]:
        """Yield a ``TokenChunk`` per generated token; closing the iterator cancels the request."""
        if self._closed:
            from .errors import EngineClosed

            raise EngineClosed("the engine is closed")
        seq = self._prepare(request, asyncio.get_running_loop())
        if request.response_format is not None:
            seq.matcher = await self._matcher(request)
        self._scheduler.submit(seq)
        self._by_request[seq.request_id] = seq
        finished = False
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            self._by_request.pop(seq.request_id, None)
            if not finished:
                self._scheduler.cancel(seq.id)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Run ``request`` to the end and return the whole completion."""
        texts: list[str] = []
        ids: list[int] = []
        last: TokenChunk | None = None
        async for chunk in self.stream(request):
            texts.append(chunk.text)
            ids.extend(chunk.token_ids)
            last = chunk
        assert last is not None and last.finish_reason is not None and last.usage is not None
        return GenerationResult(
            text="".join(texts), token_ids=ids, finish_reason=last.finish_reason, usage=last.usage
        )

    # ------------------------------------------------------------------ structured output
    async def grammar_compiler(self) -> Any:
        """The engine's :class:`~sdk.inference.structured.GrammarCompiler` (made on first use);
        ``StructuredOutputUnavailable`` without the grammar library."""
        async with self._grammar_lock:
            if self._grammar is None:
                from .structured import GrammarCompiler

                self._grammar = await asyncio.to_thread(
                    GrammarCompiler, self.tokenizer, vocab_size=self._vocab, eos_ids=sorted(self._eos))
                self._scheduler.mask_filler = self._grammar.filler()
        return self._grammar

    async def _matcher(self, request: GenerationRequest) -> Any:
        """The grammar state for ``request``'s ``response_format`` (compiled off the event loop)."""
        from .constraints import constraint_from

        constraint = constraint_from(request.response_format)
        if constraint is None:
            return None
        spec = (request.response_format or {}).get("json_schema")
        strict = bool(spec.get("strict")) if isinstance(spec, dict) else False
        compiler = await self.grammar_compiler()
        if compiler.cached(constraint, strict=strict):
            matcher = compiler.matcher(constraint, strict=strict)
        else:
            matcher = await asyncio.to_thread(compiler.matcher, constraint, strict=strict)
        done = request.generated_prefix or 0
        if done and not matcher.accept_all(list(request.prompt_token_ids or [])[-done:]):
            raise InvalidRequest("the resumed output does not match response_format", field="generated_prefix")
        return matcher

    def cancel(self, request_id: str) -> bool:
        """End a running or waiting request; its stream ends with ``finish_reason="cancelled"``."""
        seq = self._by_request.get(request_id)
        if seq is None:
            return False
        self._scheduler.cancel(seq.id)
        return True

    # ------------------------------------------------------------------ introspection and shutdown
    @property
    def metadata(self) -> dict[str, Any]:
        """The model metadata document nodes advertise."""
        return self._metadata

    def stats(self) -> dict[str, Any]:
        """Live load: queue_depth, active_streams, tokens_per_s, free_cache_tokens, prefix hit rate..."""
        return self._scheduler.stats()

    @property
    def uses_cuda_graphs(self) -> bool:
        """True when decode steps replay captured CUDA graphs."""
        return self._scheduler.decoder is not None

    @property
    def closed(self) -> bool:
        """True once :meth:`aclose` (or :meth:`close`) ran."""
        return self._closed

    def close(self) -> None:
        """Stop the worker; pending requests fail with ``EngineClosed``.

        The model keeps the paged attention, which is plain SDPA outside an engine step, so the
        model stays usable (``model.generate``) and other engines on it keep working.
        """
        if self._closed:
            return
        self._closed = True
        self._scheduler.stop()

    async def aclose(self) -> None:
        """Async :meth:`close` (the worker is joined off the event loop)."""
        await asyncio.to_thread(self.close)

    async def __aenter__(self) -> Engine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _sequence_length(requested: int | None, context: int) -> int:
    """``requested`` if the model takes it (None: its context, at most the default); else ``InvalidConfig``."""
    from .limits import DEFAULT_MAX_SEQUENCE_LENGTH

    if requested is None:
        return min(context, DEFAULT_MAX_SEQUENCE_LENGTH)
    if requested > context:
        log.error("max_sequence_length %d is above the model's context length %d", requested, context)
        raise InvalidConfig(f"max_sequence_length {requested} is above the model's context length {context}",
                            field="max_sequence_length", limit=context)
    return requested


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _serving(engine: Engine) -> dict[str, Any]:
    return {
        "max_batch_size": engine.plan.max_batch_size,
        "max_sequence_length": engine.max_sequence_length,
        "kv_cache_tokens": engine.plan.max_tokens,
        "prefix_cache_tokens": engine.config.prefix_cache_tokens,
        "max_queue_size": engine.config.max_queue_size,
        "continuous_batching": True,
        "cuda_graphs": engine.uses_cuda_graphs,
    }


def _metadata(engine: Engine, dtype: str) -> dict[str, Any]:
    """The metadata document for a model handed to :meth:`Engine.from_model`."""
    path = str(getattr(engine.model.config, "name_or_path", "") or "").rstrip("/")
    name = path.rsplit("/", 1)[-1] or type(engine.model).__name__
    try:
        from .metadata import build_metadata

        return build_metadata(
            engine.model,
            engine.tokenizer,
            name=name,
            version="unknown",
            device=engine.device,
            dtype=engine.dtype,
            context_length=engine.max_sequence_length,
            serving=_serving(engine),
        )
    except Exception:
        log.exception("could not build the metadata document; using a minimal one")
        return {"name": name, "framework": "transformers", "dtype": dtype, "device": str(engine.device),
                "context_length": engine.max_sequence_length}


def _with_serving(doc: dict[str, Any], serving: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with the engine's sizing merged in (validated by the metadata module when it can)."""
    from .metadata import MetadataError, with_serving

    try:
        return with_serving(doc, serving)
    except (MetadataError, KeyError, TypeError, ValueError):
        log.warning("metadata document failed validation with the serving block; merging unchecked")
        return {**doc, "serving": {**doc.get("serving", {}), **serving}}


def _loaded_metadata(loaded: Any, config: EngineConfig) -> dict[str, Any] | None:
    """The loader's metadata document, or None to build one from the model."""
    return dict(loaded.metadata) if getattr(loaded, "metadata", None) else None
