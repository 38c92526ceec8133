"""The OpenAI-compatible FastAPI app over any :class:`~sdk.inference.backend.GenerationBackend`.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with
``stream: true`` as server-sent events), ``GET /health`` and ``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.exceptions import HTTPException as StarletteHTTPException

from sdk.errors import AutoGLMError
from sdk.inference.backend import EngineLike, GenerationBackend, as_backend
from sdk.inference.errors import InvalidRequest
from sdk.inference.http.errors import REASON_STATUS, APIError, bad_request, from_sdk_error, param_of_field
from sdk.inference.http.metrics import Metrics
from sdk.inference.http.schemas import (
    ChatCompletionBody,
    CompletionBody,
    SamplingBody,
    message_dicts,
    unsupported,
)
from sdk.inference.http.sse import DONE, SSEResponse, event
from sdk.inference.http.tool_calls import ToolCallHold, ToolPlan, plan_tools
from sdk.inference.types import GenerationRequest  # no torch

log = logging.getLogger(__name__)

T = TypeVar("T")
B = TypeVar("B", bound=BaseModel)

MAX_BODY_BYTES = 16 * 1024 * 1024

#: Decides the error for a model the backend does not list (None: the usual 404 ``model_not_found``).
MissingModel = Callable[[str], APIError | None]
#: A backend's readiness for ``/health``: ``(ready, fields)``; not ready answers 503 ``unavailable``.
Readiness = Callable[[], tuple[bool, Mapping[str, Any]]]

_FINISH = {"stop": "stop", "length": "length", "eos": "stop", "stop_string": "stop", "max_tokens": "length"}


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; the generation was cancelled."""


# ------------------------------------------------------------------ admission control


class Admission:
    """Bounds generations in flight (``max_concurrent``) and those waiting (``max_queued``)."""

    def __init__(self, max_concurrent: int, max_queued: int, metrics: Metrics) -> None:
        if max_concurrent < 1 or max_queued < 0:
            raise ValueError("max_concurrent must be >= 1 and max_queued >= 0")
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.active = 0
        self.waiting = 0
        self.draining = False
        self._slots = asyncio.Semaphore(max_concurrent)
        self._metrics = metrics

    def check_open(self) -> None:
        """Refuse new work while the server drains for shutdown."""
        if self.draining:
            raise APIError(503, "server is shutting down", type="service_unavailable",
                           code="service_unavailable", reason="shutting_down")

    async def acquire(self, request: Request) -> Lease:
        """Take a slot, waiting in the bounded queue; 429 when the queue is full."""
        self.check_open()
        if self._slots.locked() and self.waiting >= self.max_queued:
            raise APIError(429, f"server overloaded: {self.active} requests running and {self.waiting} "
                           "queued; retry later", type="server_overloaded", code="server_overloaded",
                           reason="overloaded")
        self.waiting += 1
        self._metrics.queue_depth.set(self.waiting)
        try:
            await _unless_disconnected(request, self._slots.acquire())
        finally:
            self.waiting -= 1
            self._metrics.queue_depth.set(self.waiting)
        self.active += 1
        self._metrics.active.set(self.active)
        return Lease(self)

    def release_slot(self) -> None:
        """Free one slot (what :meth:`Lease.release` calls)."""
        self.active -= 1
        self._metrics.active.set(self.active)
        self._slots.release()


class Lease:
    """One held slot; ``release()`` is idempotent."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        """Give the slot back (once)."""
        if self._admission is not None:
            self._admission.release_slot()
            self._admission = None


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, aw: Awaitable[T]) -> T:
    """Await ``aw`` but cancel it (and raise ClientDisconnected) if the client disconnects first."""
    work: asyncio.Future[T] = asyncio.ensure_future(aw)
    watch: asyncio.Future[None] = asyncio.ensure_future(_wait_disconnect(request))
    either: list[asyncio.Future[T] | asyncio.Future[None]] = [work, watch]
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise ClientDisconnected()
    finally:
        for task in (work, watch):
            if not task.done():
                task.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        if not work.done() or work.cancelled():
            await asyncio.gather(work, return_exceptions=True)


# ------------------------------------------------------------------ helpers


def _usage(usage: Any) -> tuple[int, int]:
    """``(prompt_tokens, completion_tokens)`` from a dataclass-or-dict usage record."""
    if usage is None:
        return 0, 0
    get = usage.get if isinstance(usage, Mapping) else (lambda k, d=None: getattr(usage, k, d))
    return int(get("prompt_tokens", 0) or 0), int(get("completion_tokens", 0) or 0)


def _usage_body(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(reason: Any) -> str:
    return _FINISH.get(str(reason), "stop")


def _param_of(err: ErrorDetails) -> str | None:
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    return ".".join(loc) or None


async def _parse(request: Request, model: type[B]) -> B:
    """Parse the JSON body into ``model``; malformed JSON and invalid fields are 400s."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large",
                       reason="invalid_request")
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large",
                       reason="invalid_request")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param_of(first)
        raise bad_request(f"{param or 'body'}: {first['msg']}", param=param) from exc


def _internal_error() -> APIError:
    return APIError(500, "internal error", type="internal_error", code="internal_error",
                    reason="internal_error")


def _error_response(err: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


# ------------------------------------------------------------------ the app


class _Service:
    """Request handling shared by both generation endpoints."""

    def __init__(
        self,
        backend: GenerationBackend,
        *,
        served_model_name: str | None,
        admission: Admission,
        metrics: Metrics,
        default_max_tokens: int,
        error_table: Mapping[str, tuple[int, str, str | None]],
        missing_model: MissingModel | None = None,
    ) -> None:
        self.backend = backend
        self.missing_model = missing_model
        self.served_model_name = served_model_name
        self.admission = admission
        self.metrics = metrics
        self.default_max_tokens = default_max_tokens
        self.error_table = error_table
        self.created = int(time.time())

    # -- models

    def model_cards(self) -> list[dict[str, Any]]:
        """``/v1/models`` entries; the metadata document rides along under ``metadata``."""
        docs = self.backend.models()
        cards = []
        for doc in docs:
            name = str(doc.get("name") or doc.get("id") or "model")
            model_id = self.served_model_name if (self.served_model_name and len(docs) == 1) else name
            cards.append({"id": model_id, "object": "model", "created": self.created,
                          "owned_by": "autoglm", "metadata": doc, "_name": name})
        return cards

    def resolve_model(self, requested: str) -> str:
        """The served id ``requested`` names (its id or its metadata name); 404 if none (or the
        error ``missing_model`` decides on)."""
        for card in self.model_cards():
            if requested in (card["id"], card["_name"]):
                return str(card["id"])
        decided = self.missing_model(requested) if self.missing_model is not None else None
        if decided is not None:
            raise decided
        raise APIError(404, f"The model '{requested}' does not exist", param="model",
                       code="model_not_found", reason="model_not_found")

    # -- requests

    def build_request(
        self, body: SamplingBody, model_id: str, *, request_id: str, plan: ToolPlan | None = None, **prompt: Any
    ) -> GenerationRequest:
        """Map OpenAI sampling fields onto a validated ``GenerationRequest`` (400 if invalid)."""
        problem = unsupported(body)
        if problem is not None:
            raise bad_request(problem[1], param=problem[0], code="unsupported_parameter")
        plan = plan or ToolPlan(response_format=body.response_format)
        max_tokens = body.max_tokens
        if isinstance(body, ChatCompletionBody) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        if max_tokens is None:
            max_tokens = 16 if isinstance(body, CompletionBody) else self.default_max_tokens
        try:
            return GenerationRequest(
                **prompt,
                max_new_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k or 0,
                stop=body.stop_list(),
                seed=body.seed,
                request_id=request_id,
                model=model_id,
                response_format=plan.response_format,
                tools=plan.render,
            ).validate()
        except InvalidRequest as exc:
            if exc.reason != "invalid_request":  # a schema: invalid_schema, unsupported_schema...
                raise APIError(400, str(exc), param=param_of_field(exc.field), code=exc.reason,
                               reason=exc.reason) from exc
            raise bad_request(str(exc), param=param_of_field(exc.field)) from exc

    def tool_plan(self, body: ChatCompletionBody) -> ToolPlan:
        """The request's :class:`ToolPlan` (400 for bad or conflicting tools / tool_choice)."""
        from sdk.inference.constraints import check_tools

        try:
            check_tools(body.tools)
            return plan_tools(body.tools, body.tool_choice, body.response_format)
        except InvalidRequest as exc:
            raise APIError(400, str(exc), param="tools", code=exc.reason, reason=exc.reason) from exc
        except ValueError as exc:
            param, message = exc.args
            raise bad_request(message, param=param, code="invalid_tool_choice") from exc

    async def handle(self, request: Request, *, chat: bool) -> Response:
        """Parse, admit, generate (streamed or whole) and account for one request."""
        endpoint = "chat_completions" if chat else "completions"
        start = time.perf_counter()
        lease: Lease | None = None
        streaming = False
        status = 500
        try:
            self.admission.check_open()
            body: SamplingBody = await _parse(request, ChatCompletionBody if chat else CompletionBody)
            model_id = self.resolve_model(body.model)
            ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            plan = ToolPlan()
            if isinstance(body, ChatCompletionBody):
                messages = message_dicts(body.messages)
                plan = self.tool_plan(body)
                req = self.build_request(body, model_id, request_id=ident, plan=plan, messages=messages)
            else:
                assert isinstance(body, CompletionBody)
                text = body.prompt_text()
                prompt = {"prompt_token_ids": text} if isinstance(text, list) else {"prompt": text}
                req = self.build_request(body, model_id, request_id=ident, **prompt)
            lease = await self.admission.acquire(request)
            if body.stream:
                response = await self._stream(request, req, body, lease, ident=ident, model_id=model_id,
                                              chat=chat, endpoint=endpoint, start=start, plan=plan)
                streaming = True
                return response
            result = await _unless_disconnected(request, self.backend.generate(req))
            self.metrics.ttft.labels(endpoint).observe(_ttft(result, start))
            prompt_toks, completion_toks = _usage(getattr(result, "usage", None))
            self._count_tokens(prompt_toks, completion_toks)
            status = 200
            return JSONResponse(_whole_body(result, ident=ident, model_id=model_id, chat=chat,
                                            created=int(time.time()), plan=plan))
        except ClientDisconnected:
            status = 499
            self.metrics.errors.labels("client_disconnected").inc()
            log.info("%s: client disconnected; generation cancelled", endpoint)
            return Response(status_code=499)
        except AutoGLMError as exc:
            err = from_sdk_error(exc, table=self.error_table)
            status = err.status
            self.metrics.errors.labels(err.reason).inc()
            if err.status >= 500:
                log.error("%s failed (%s): %s", endpoint, exc.reason, exc, exc_info=exc)
            else:
                log.info("%s rejected (%s): %s", endpoint, err.reason, err.message)
            return _error_response(err)
        except Exception:
            self.metrics.errors.labels("internal_error").inc()
            log.exception("%s: unexpected error", endpoint)
            return _error_response(_internal_error())
        finally:
            if not streaming:
                if lease is not None:
                    lease.release()
                self.metrics.requests.labels(endpoint, str(status)).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    def _count_tokens(self, prompt: int, completion: int) -> None:
        self.metrics.prompt_tokens.inc(prompt)
        self.metrics.completion_tokens.inc(completion)

    async def _stream(
        self,
        request: Request,
        req: GenerationRequest,
        body: SamplingBody,
        lease: Lease,
        *,
        ident: str,
        model_id: str,
        chat: bool,
        endpoint: str,
        start: float,
        plan: ToolPlan,
    ) -> Response:
        """Start the backend stream, wait for its first chunk (so early errors keep their status),
        then hand the rest to an SSE response."""
        chunks = self.backend.stream(req)
        closed = False

        async def close_backend() -> None:
            nonlocal closed
            if not closed:
                closed = True
                aclose = getattr(chunks, "aclose", None)
                if aclose is not None:
                    await aclose()

        try:
            first = await _unless_disconnected(request, chunks.__anext__())
        except StopAsyncIteration:
            first = None
        except BaseException:
            await close_backend()
            raise
        created = int(time.time())
        include_usage = body.include_usage()
        obj = "chat.completion.chunk" if chat else "text_completion"
        outcome = {"status": 200, "done": False}

        def frame(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            payload: dict[str, Any] = {"id": ident, "object": obj, "created": created, "model": model_id}
            if chat:
                payload["system_fingerprint"] = None
            payload["choices"] = choices
            if include_usage:
                payload["usage"] = None
            payload.update(extra)
            return event(payload)

        def piece(text: str | None, finish: str | None) -> bytes:
            if chat:
                delta = {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return frame([choice])

        hold = ToolCallHold(plan)

        async def events() -> AsyncIterator[bytes]:
            usage: Any = None
            finish: Any = None
            seen_token = False
            try:
                if chat:
                    yield frame([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                  "logprobs": None, "finish_reason": None}])
                chunk = first
                while chunk is not None:
                    if not seen_token and getattr(chunk, "token_ids", None):
                        seen_token = True
                        self.metrics.ttft.labels(endpoint).observe(time.perf_counter() - start)
                    text = hold.push(chunk.text) if chunk.text else ""
                    if text:
                        yield piece(text, None)
                    if getattr(chunk, "usage", None) is not None:
                        usage = chunk.usage
                    if getattr(chunk, "finish_reason", None) is not None:
                        finish = chunk.finish_reason
                    chunk = await anext(chunks, None)
                rest, calls = hold.finish()
                if rest:
                    yield piece(rest, None)
                if calls:
                    delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]}
                    yield frame([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])
                yield piece(None, "tool_calls" if calls else _finish(finish))
                prompt_toks, completion_toks = _usage(usage)
                self._count_tokens(prompt_toks, completion_toks)
                if include_usage:
                    yield frame([], usage=_usage_body(prompt_toks, completion_toks))
                outcome["done"] = True
                yield DONE
            except AutoGLMError as exc:
                err = from_sdk_error(exc, table=self.error_table)
                outcome["status"] = err.status
                self.metrics.errors.labels(err.reason).inc()
                log.warning("%s stream failed (%s): %s", endpoint, err.reason, exc)
                yield event(err.body())
                yield DONE
            except Exception:
                outcome["status"] = 500
                self.metrics.errors.labels("internal_error").inc()
                log.exception("%s stream failed", endpoint)
                yield event(_internal_error().body())
                yield DONE

        async def on_close() -> None:
            if outcome["status"] == 200 and not outcome["done"]:
                outcome["status"] = 499
                self.metrics.errors.labels("client_disconnected").inc()
                log.info("%s: client disconnected mid-stream; generation cancelled", endpoint)
            try:
                await close_backend()
            finally:
                lease.release()
                self.metrics.requests.labels(endpoint, str(outcome["status"])).inc()
                self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

        return SSEResponse(events(), on_close=on_close)


def _ttft(result: Any, start: float) -> float:
    usage = getattr(result, "usage", None)
    value = getattr(usage, "time_to_first_token_s", None) if usage is not None else None
    return float(value) if isinstance(value, int | float) else time.perf_counter() - start


def _whole_body(result: Any, *, ident: str, model_id: str, chat: bool, created: int,
                plan: ToolPlan | None = None) -> dict[str, Any]:
    prompt_toks, completion_toks = _usage(getattr(result, "usage", None))
    finish = _finish(getattr(result, "finish_reason", None))
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        calls = plan.tool_calls(result.text) if plan is not None else None
        if calls:
            message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
        choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    body: dict[str, Any] = {"id": ident, "object": obj, "created": created, "model": model_id,
                            "choices": [choice], "usage": _usage_body(prompt_toks, completion_toks)}
    if chat:
        body["system_fingerprint"] = None
    return body


def create_app(
    backend: GenerationBackend | EngineLike,
    *,
    served_model_name: str | None = None,
    max_concurrent: int = 64,
    max_queued: int = 256,
    api_keys: Collection[str] | None = None,
    default_max_tokens: int = 512,
    error_statuses: Mapping[str, tuple[int, str, str | None]] | None = None,
    missing_model: MissingModel | None = None,
    readiness: Readiness | None = None,
) -> FastAPI:
    """Build the OpenAI-compatible app over ``backend`` (a GenerationBackend or an engine).

    ``max_concurrent`` generations run at once, ``max_queued`` more wait, the rest get 429.
    ``api_keys``, when given, are required as ``Authorization: Bearer <key>`` on ``/v1/*``.
    ``error_statuses`` extends the reason → (status, type, code) table for backend errors.
    ``missing_model`` picks the error for a model the backend does not list (default 404);
    ``readiness`` adds the backend's own fields to ``/health`` and answers 503 while not ready.
    """
    backend = as_backend(backend)
    metrics = Metrics(backend.stats)
    admission = Admission(max_concurrent, max_queued, metrics)
    service = _Service(
        backend,
        served_model_name=served_model_name,
        admission=admission,
        metrics=metrics,
        default_max_tokens=default_max_tokens,
        error_table={**REASON_STATUS, **(error_statuses or {})},
        missing_model=missing_model,
    )
    keys = [k.encode() for k in api_keys or ()]

    app = FastAPI(title="Open-AutoGLM inference", version="1", docs_url=None, redoc_url=None)
    app.state.backend = backend
    app.state.metrics = metrics
    app.state.admission = admission

    async def _check_key(request: Request) -> None:
        if keys:
            header = request.headers.get("authorization", "")
            given = header[7:].strip().encode() if header.lower().startswith("bearer ") else b""
            if not any(hmac.compare_digest(given, k) for k in keys):
                metrics.errors.labels("invalid_api_key").inc()
                raise APIError(401, "invalid or missing API key", code="invalid_api_key",
                               reason="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_check_key)])

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(APIError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(_internal_error())

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        cards = [{k: v for k, v in c.items() if k != "_name"} for c in service.model_cards()]
        return {"object": "list", "data": cards}

    @v1.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        try:
            served = service.resolve_model(model_id)
        except APIError as err:
            return _error_response(err)
        card = next(c for c in service.model_cards() if c["id"] == served)
        return JSONResponse({k: v for k, v in card.items() if k != "_name"})

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await service.handle(request, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await service.handle(request, chat=True)

    app.include_router(v1)

    @app.get("/health")
    async def health() -> Response:
        if admission.draining:
            return JSONResponse({"status": "shutting_down"}, status_code=503)
        try:
            ready, fields = readiness() if readiness is not None else (True, {})
            if not ready:
                return JSONResponse({"status": "unavailable", **fields}, status_code=503)
            stats = json.loads(json.dumps(dict(backend.stats()), default=str))
            models = [c["id"] for c in service.model_cards()]
        except Exception as exc:  # noqa: BLE001 - any backend failure means "unavailable", not a 500
            log.warning("health check: backend unavailable: %s", exc)
            return JSONResponse({"status": "unavailable", "detail": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok", **fields, "models": models, "active": admission.active,
                             "queued": admission.waiting, "backend": stats})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


__all__ = ["create_app", "Admission", "Lease", "ClientDisconnected", "MissingModel", "Readiness"]
