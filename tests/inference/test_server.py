"""The OpenAI-compatible HTTP API over the real SmolLM2 engine, driven by the official ``openai`` client."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai
import pytest

from sdk.errors import InferenceError
from sdk.inference.http import create_app
from sdk.inference.server import HTTPServer
from sdk.inference.types import TokenChunk
from tests.inference.http_harness import ServerThread

pytestmark = [pytest.mark.model, pytest.mark.slow]

MODEL = "smollm2-test"
FRANCE = "The capital of France is"
LONG = "Count from 1 to 1000: 1, 2, 3,"  # greedy SmolLM2 keeps counting until max_tokens
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
    """Poll ``predicate`` until true (returns False on timeout; the assertion is the caller's)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def srv(smollm2_engine: Any) -> Iterator[ServerThread]:
    with ServerThread(create_app(smollm2_engine, served_model_name=MODEL)) as server:
        yield server


@pytest.fixture(scope="module")
def client(srv: ServerThread) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=srv.api_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def http(srv: ServerThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.base_url, timeout=60) as c:
        yield c


def idle(engine: Any) -> bool:
    stats = engine.stats()
    return stats["active_streams"] == 0 and stats["queue_depth"] == 0


# ------------------------------------------------------------------ happy paths


def test_models_list_advertises_metadata(client: openai.OpenAI, smollm2_engine: Any) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    meta = models[0].model_extra["metadata"]
    assert meta["name"] == smollm2_engine.metadata["name"]
    assert meta["context_length"] > 0
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_is_sensible_with_usage(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=FRANCE, max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 8 and r.usage.total_tokens == 13


def test_model_may_be_named_by_metadata_name(client: openai.OpenAI, smollm2_engine: Any) -> None:
    name = smollm2_engine.metadata["name"]
    r = client.completions.create(model=name, prompt=FRANCE, max_tokens=2, temperature=0)
    assert r.model == MODEL


def test_chat_completion_answers(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and "Paris" in msg.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_chat_equals_non_streaming_under_greedy(client: openai.OpenAI) -> None:
    args: dict[str, Any] = dict(model=MODEL, messages=CHAT, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_streaming_completion_equals_non_streaming(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=FRANCE, max_tokens=12, temperature=0)
    stream = client.completions.create(model=MODEL, prompt=FRANCE, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk


def test_sse_framing_ends_with_done(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1]["choices"][0]["delta"] == {} and events[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_sequence_and_prompt_token_ids(client: openai.OpenAI, smollm2_engine: Any) -> None:
    free = client.completions.create(model=MODEL, prompt=FRANCE, max_tokens=12, temperature=0).choices[0].text
    word = free.split()[1]  # a word after "Paris"
    r = client.completions.create(model=MODEL, prompt=FRANCE, max_tokens=12, temperature=0, stop=[word])
    assert r.choices[0].finish_reason == "stop"
    assert word not in r.choices[0].text and free.startswith(r.choices[0].text)
    ids = smollm2_engine.tokenizer(FRANCE)["input_ids"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == free


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    args: dict[str, Any] = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0)
    first = client.completions.create(**args, seed=7, extra_body={"top_k": 40})
    second = client.completions.create(**args, seed=7, extra_body={"top_k": 40})
    assert first.choices[0].text == second.choices[0].text


def test_max_completion_tokens_is_honoured(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3


# ------------------------------------------------------------------ errors


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]  # type: ignore[no-any-return]


def test_malformed_json_is_400(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"


def test_invalid_fields_are_400_with_param(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "temperature": 5})
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"
    r = http.post("/v1/chat/completions", json={"model": MODEL})
    assert r.status_code == 400 and error_of(r)["param"] == "messages"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "stop": ["a"] * 17})
    assert r.status_code == 400 and error_of(r)["param"] == "stop"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"stop": ["x" * 10_000]}, "stop"),  # one huge stop string: work for every token
        ({"seed": 2**70}, "seed"),  # past what the sampler's generator takes
        ({"top_k": 10**12}, "top_k"),
        ({"prompt": [2**40]}, "prompt"),  # a token id no vocabulary has
    ],
)
def test_requests_are_validated_before_the_backend(
    http: httpx.Client, smollm2_engine: Any, extra: dict[str, Any], param: str
) -> None:
    served = smollm2_engine.stats()["completed_requests"]
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert smollm2_engine.stats()["completed_requests"] == served


def test_oversized_body_is_413(http: httpx.Client) -> None:
    from sdk.inference.http.app import MAX_BODY_BYTES

    big = b" " * (MAX_BODY_BYTES + 1)
    r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"


def test_prompt_too_long_is_400_context_length_exceeded(client: openai.OpenAI, smollm2_engine: Any) -> None:
    prompt = "hello " * (smollm2_engine.max_sequence_length + 10)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, stream=stream)
        assert info.value.body["code"] == "context_length_exceeded"
    assert wait_until(lambda: idle(smollm2_engine))


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"presence_penalty": 0.5}, "presence_penalty")],
)
def test_unsupported_parameters_are_400(client: openai.OpenAI, kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2, **kwargs)
    assert info.value.body["param"] == param and info.value.body["code"] == "unsupported_parameter"


def test_unknown_route_is_openai_shaped_404(http: httpx.Client) -> None:
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"


def test_overload_is_429_and_disconnect_frees_the_slot(smollm2_engine: Any) -> None:
    app = create_app(smollm2_engine, served_model_name=MODEL, max_concurrent=1, max_queued=0)
    body = {"model": MODEL, "prompt": LONG, "max_tokens": 400, "temperature": 0, "stream": True}
    with ServerThread(app) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as http, \
            openai.OpenAI(base_url=srv.api_url, api_key="x", max_retries=0) as client:
        with http.stream("POST", "/v1/completions", json=body) as held:
            assert held.status_code == 200
            lines = held.iter_lines()  # keep a reference: a dropped iterator closes the connection
            next(lines)  # generating now: holds the only slot
            with pytest.raises(openai.RateLimitError) as info:
                client.completions.create(model=MODEL, prompt=FRANCE, max_tokens=2)
            assert info.value.body["code"] == "server_overloaded"
            assert info.value.response.headers["retry-after"] == "1"
        # the client hung up mid-stream: the generation is cancelled and the slot is free again
        assert wait_until(lambda: idle(smollm2_engine) and app.state.admission.active == 0)
        r = client.completions.create(model=MODEL, prompt=FRANCE, max_tokens=2, temperature=0)
        assert r.usage.completion_tokens == 2
        metrics = http.get("/metrics").text
    assert 'autoglm_http_errors_total{reason="overloaded"} 1.0' in metrics
    assert 'autoglm_http_errors_total{reason="client_disconnected"} 1.0' in metrics


def test_engine_queue_full_is_429(make_engine: Callable[..., Any]) -> None:
    engine = make_engine(max_batch_size=1, max_queue_size=0)
    app = create_app(engine, served_model_name=MODEL)  # the HTTP layer admits; the engine refuses
    body = {"model": MODEL, "prompt": LONG, "max_tokens": 400, "temperature": 0, "stream": True}
    with ServerThread(app) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as held:
            lines = held.iter_lines()
            next(lines)
            for stream in (False, True):
                r = http.post("/v1/completions", json={**body, "max_tokens": 2, "stream": stream})
                assert r.status_code == 429 and error_of(r)["code"] == "server_overloaded"
        assert wait_until(lambda: idle(engine))


def test_concurrent_requests_queue_then_all_complete(smollm2_engine: Any) -> None:
    app = create_app(smollm2_engine, served_model_name=MODEL, max_concurrent=2, max_queued=8)
    prompts = ["The capital of France is", "Water boils at", "The three primary colors are", "Python is"]
    with ServerThread(app) as srv, openai.OpenAI(base_url=srv.api_url, api_key="x", max_retries=0) as client:

        def run(prompt: str) -> str:
            r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
            return r.choices[0].text

        sequential = [run(p) for p in prompts]
        with ThreadPoolExecutor(len(prompts)) as pool:
            concurrent = list(pool.map(run, prompts))
    assert concurrent == sequential


def test_non_streaming_disconnect_cancels_generation(smollm2_engine: Any, srv: ServerThread) -> None:
    body = {"model": MODEL, "prompt": LONG, "max_tokens": 400, "temperature": 0, "extra": "ignored"}
    before = smollm2_engine.stats()["generated_tokens"]
    with httpx.Client(base_url=srv.base_url, timeout=httpx.Timeout(60, read=0.5)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/v1/completions", json=body)
    assert wait_until(lambda: idle(smollm2_engine))
    assert smollm2_engine.stats()["generated_tokens"] - before < 400


def test_api_keys_are_required_when_configured(smollm2_engine: Any) -> None:
    app = create_app(smollm2_engine, served_model_name=MODEL, api_keys=["sekret"])
    with ServerThread(app) as srv:
        with openai.OpenAI(base_url=srv.api_url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=srv.api_url, api_key="sekret", max_retries=0) as good:
            assert good.models.list().data[0].id == MODEL
        assert httpx.get(srv.base_url + "/health").status_code == 200


def test_draining_server_answers_503(smollm2_engine: Any) -> None:
    app = create_app(smollm2_engine, served_model_name=MODEL)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.base_url) as http:
        app.state.admission.draining = True
        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code == 503 and error_of(r)["code"] == "service_unavailable"
        assert http.get("/health").status_code == 503


def test_port_in_use_is_a_typed_error(srv: ServerThread) -> None:
    taken = HTTPServer(srv.app, host="127.0.0.1", port=srv.server.port)
    with pytest.raises(InferenceError) as info:
        srv.call(taken.start())
    assert info.value.reason == "bind_failed"


class _BrokenBackend:
    """A backend with a bug: the HTTP layer must answer 500 and keep serving."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def models(self) -> list[dict[str, Any]]:
        return [self.engine.metadata]

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def generate(self, req: Any) -> Any:
        raise RuntimeError("backend bug")

    async def stream(self, req: Any) -> Any:
        yield TokenChunk("partial", [1])
        raise RuntimeError("backend bug")


def test_internal_errors_are_500_and_logged(smollm2_engine: Any, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(_BrokenBackend(smollm2_engine), served_model_name=MODEL)
    body = {"model": MODEL, "prompt": FRANCE, "max_tokens": 2}
    with ServerThread(app) as srv, httpx.Client(base_url=srv.base_url, timeout=60) as http:
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 500 and error_of(r)["type"] == "internal_error"
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line]
        assert json.loads(lines[-2][6:])["error"]["code"] == "internal_error" and lines[-1] == "data: [DONE]"
        assert http.get("/health").status_code == 200
    assert "backend bug" in caplog.text


# ------------------------------------------------------------------ health and metrics


def test_health_reports_models_and_load(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["models"] == [MODEL]
    assert {"queue_depth", "active_streams", "prefix_cache_hit_rate"} <= set(body["backend"])


def test_metrics_count_requests_tokens_and_errors(client: openai.OpenAI, http: httpx.Client) -> None:
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in r.text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['autoglm_http_requests_total{endpoint="chat_completions",status="200"}'] >= 1
    assert samples['autoglm_http_requests_total{endpoint="chat_completions",status="404"}'] >= 1
    assert samples['autoglm_http_errors_total{reason="model_not_found"}'] >= 1
    assert samples["autoglm_completion_tokens_total"] >= 3
    assert samples["autoglm_prompt_tokens_total"] > 0
    assert samples['autoglm_request_latency_seconds_count{endpoint="chat_completions"}'] >= 1
    assert samples['autoglm_time_to_first_token_seconds_count{endpoint="chat_completions"}'] >= 1
    assert "autoglm_http_queue_depth" in samples and "autoglm_backend_queue_depth" in samples
    assert samples["autoglm_backend_generated_tokens_total"] > 0
