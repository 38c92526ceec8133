"""Every /metrics the SDK serves passes Prometheus' naming rules: the server app (over a fake
backend with the engine's stats), the mesh gateway and the coordinator registry.

``promtool check metrics`` runs when promtool is installed (Debian's ``prometheus`` package); the
parser checks below run always.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sdk.coord.coordinator.metrics import CoordinatorMetrics
from sdk.identity import Key
from sdk.inference.http import create_app
from sdk.inference.http.metrics import COUNTER_STATS, Metrics, stat_metric_name
from sdk.inference.types import GenerationRequest, GenerationResult, TokenChunk, Usage
from tests.inference.http_harness import ServerThread

#: The engine's stats() keys and kinds of values (as the scheduler reports them).
ENGINE_STATS: dict[str, Any] = {
    "queue_depth": 0, "active_streams": 0, "max_batch_size": 8, "max_sequence_length": 512,
    "tokens_per_s": 41.5, "free_cache_tokens": 4096, "free_slots": 8, "completed_requests": 3,
    "generated_tokens": 12, "prefix_cache_hit_rate": 0.25, "prefix_cache_hits": 1, "prefix_cache_lookups": 4,
    "prefix_cache_entries": 1, "prefix_cache_tokens": 9,
}
USAGE = Usage(prompt_tokens=2, completion_tokens=4, time_to_first_token_s=0.01, tokens_per_s=100.0)
ABBREVIATED = re.compile(r"_(per_s|s|ms|us|ns|sec|secs|kb|mb|gb)(_|$)")


class FakeBackend:
    """One model, four tokens per request, the engine's stats: enough for the app to serve."""

    def __init__(self) -> None:
        self.stats_now = dict(ENGINE_STATS)

    def models(self) -> list[dict[str, Any]]:
        return [{"name": "fake"}]

    def stats(self) -> dict[str, Any]:
        return dict(self.stats_now)

    async def stream(self, req: GenerationRequest, /) -> AsyncIterator[TokenChunk]:
        for i in range(3):
            yield TokenChunk(f"t{i}", [i])
        yield TokenChunk("!", [3], finish_reason="length", usage=USAGE)

    async def generate(self, req: GenerationRequest, /) -> GenerationResult:
        return GenerationResult(text="t0t1t2!", token_ids=[0, 1, 2, 3], finish_reason="length",
                                usage=USAGE)


def naming_problems(text: str) -> list[str]:
    """What breaks the conventions in one exposition: types, ``_total`` on counters, units."""
    problems = []
    families = list(text_string_to_metric_families(text))
    assert families, "empty exposition"
    for fam in families:
        if fam.type not in ("counter", "gauge", "histogram"):
            problems.append(f"{fam.name}: type {fam.type}")
        if ABBREVIATED.search(fam.name):
            problems.append(f"{fam.name}: abbreviated unit")
        for sample in fam.samples:
            if fam.type == "counter" and not sample.name.endswith(("_total", "_created")):
                problems.append(f"{sample.name}: counter sample without _total")
            if fam.type == "gauge" and sample.name.endswith("_total"):
                problems.append(f"{sample.name}: gauge named like a counter")
    return problems


def kinds(text: str) -> dict[str, str]:
    return {fam.name: fam.type for fam in text_string_to_metric_families(text)}


def promtool(text: str) -> None:
    """``promtool check metrics`` on ``text`` (skipped when promtool is not installed)."""
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    done = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and not done.stdout.strip() and not done.stderr.strip(), done.stdout + done.stderr


# ------------------------------------------------------------------ the scrapes


@pytest.fixture(scope="module")
def server_scrape() -> str:
    """/metrics of the server app after a whole, a streamed and a refused request."""
    with ServerThread(create_app(FakeBackend())) as srv, httpx.Client(base_url=srv.base_url, timeout=30) as http:
        assert http.post("/v1/completions", json={"model": "fake", "prompt": "x", "max_tokens": 4}).status_code == 200
        with http.stream("POST", "/v1/completions",
                         json={"model": "fake", "prompt": "x", "max_tokens": 4, "stream": True}) as s:
            assert s.status_code == 200 and list(s.iter_lines())
        assert http.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
        r = http.get("/metrics")
        assert r.status_code == 200
        return r.text


def coordinator_scrape() -> str:
    m = CoordinatorMetrics()
    m.event("presence")
    m.event("custom")
    m.start("e1", {"did:key:z1": 1})
    m.config_sent(512)
    m.report("did:key:z1", 1, "applied", apply_ms=3.0)
    m.report("did:key:z2", 4, "failed")
    m.event_work(0.002)
    for name in ("auth", "rejected", "sessions_ended", "reports"):
        getattr(m, name).labels("x").inc()
    m.store_behind.inc()
    m.devices.labels("online").set(2)
    return m.prometheus().decode()


async def gateway_scrape(url: str) -> str:
    """/metrics of a gateway over a real router (no node: the request is refused) on ``url``."""
    from sdk.inference.server import HTTPServer
    from sdk.mesh import Mesh
    from sdk.mesh.gateway import create_gateway_app

    async with Mesh(url, Key.generate(), require_node_credential=False) as mesh, \
            HTTPServer(create_gateway_app(mesh), port=0) as server, \
            httpx.AsyncClient(base_url=server.url.removesuffix("/v1"), timeout=30) as http:
        r = await http.post("/v1/completions", json={"model": "m", "prompt": "x"})
        assert r.status_code == 503
        scrape = await http.get("/metrics")
        assert scrape.status_code == 200
        return scrape.text


# ------------------------------------------------------------------ always on: the parser


def test_server_metrics_follow_the_naming_rules(server_scrape: str) -> None:
    assert naming_problems(server_scrape) == []
    types = kinds(server_scrape)
    for counter in ("autoglm_http_requests", "autoglm_http_errors", "autoglm_prompt_tokens",
                    "autoglm_completion_tokens"):
        assert types[counter] == "counter"
    for key in COUNTER_STATS & set(ENGINE_STATS):  # the engine's running totals are counters
        assert types[stat_metric_name(key)[0]] == "counter", key
    assert types["autoglm_backend_tokens_per_second"] == "gauge"
    assert types["autoglm_backend_queue_depth"] == "gauge"
    assert "autoglm_backend_generated_tokens_total 12.0" in server_scrape
    assert "tokens_per_s " not in server_scrape and "tokens_per_s{" not in server_scrape


def test_coordinator_metrics_follow_the_naming_rules() -> None:
    text = coordinator_scrape()
    assert naming_problems(text) == []
    types = kinds(text)
    for counter in ("autoglm_coord_events", "autoglm_coord_reports", "autoglm_coord_auth", "autoglm_coord_rejected"):
        assert types[counter] == "counter"
    assert types["autoglm_coord_devices"] == "gauge"


def test_stat_names_spell_out_units() -> None:
    assert stat_metric_name("tokens_per_s") == ("autoglm_backend_tokens_per_second", 1.0)
    assert stat_metric_name("uptime_s") == ("autoglm_backend_uptime_seconds", 1.0)
    assert stat_metric_name("step_ms") == ("autoglm_backend_step_seconds", 0.001)
    assert stat_metric_name("Cache Hits") == ("autoglm_backend_cache_hits", 1.0)


def test_the_rules_catch_bad_names() -> None:
    """The checker itself fails on the mistakes it exists for."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    r = CollectorRegistry()
    Gauge("autoglm_tokens_per_s", "abbreviated", registry=r).set(1)
    Gauge("autoglm_requests_total", "a running total as a gauge", registry=r).set(1)
    problems = naming_problems(generate_latest(r).decode())
    assert any("abbreviated" in p for p in problems) and any("like a counter" in p for p in problems)


def test_broken_backend_stats_leave_the_rest_of_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("stats bug")

    text = Metrics(broken).render().decode()
    assert "autoglm_http_requests" in text and "autoglm_backend_" not in text
    assert "stats bug" in caplog.text


@pytest.mark.broker
async def test_gateway_metrics_follow_the_naming_rules(embedded_broker: Any) -> None:
    text = await gateway_scrape(embedded_broker.url)
    assert naming_problems(text) == []
    types = kinds(text)
    for key in ("requests", "errors", "adverts", "failovers"):  # the router's running totals
        assert types[stat_metric_name(key)[0]] == "counter", key
    assert types["autoglm_backend_nodes"] == "gauge"
    assert types["autoglm_backend_tokens_per_second"] == "gauge"
    assert 'autoglm_http_errors_total{reason="no_node"} 1.0' in text


# ------------------------------------------------------------------ promtool, where installed


def test_promtool_accepts_the_server_metrics(server_scrape: str) -> None:
    promtool(server_scrape)


def test_promtool_accepts_the_coordinator_metrics() -> None:
    promtool(coordinator_scrape())


@pytest.mark.broker
async def test_promtool_accepts_the_gateway_metrics(embedded_broker: Any) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    promtool(await gateway_scrape(embedded_broker.url))


def test_promtool_rejects_the_old_names() -> None:
    """promtool is a real check here: the name the server used to export fails it."""
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    done = subprocess.run(["promtool", "check", "metrics"], capture_output=True, text=True, timeout=30,
                          input="# HELP autoglm_backend_tokens_per_s x\n# TYPE autoglm_backend_tokens_per_s gauge\n"
                                "autoglm_backend_tokens_per_s 1.0\n")
    assert "abbreviated units" in done.stdout + done.stderr
