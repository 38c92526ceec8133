"""Capacity-aware routing: advertised hardware and measured capacity, estimates, malformed adverts."""

from __future__ import annotations

import asyncio
import logging
import math
import time

import pytest

from sdk.identity import Key
from sdk.inference import GenerationRequest
from sdk.mesh import NodeAdvert, RouterConfig
from sdk.mesh import topics as mesh_topics
from sdk.mesh.adverts import NodeLoad
from sdk.mesh.capacity import AdvertFieldError, Capacity, calibrate, detect_hardware, estimate, parse_hardware
from sdk.mesh.protocol import ADVERT
from sdk.messaging import SecureClient
from sdk.messaging.topics import client_token
from sdk.testing import FakeEngine
from tests.fixtures.brokers import BROKER_PARAMS
from tests.fixtures.waiting import until
from tests.mesh.routing_env import MODEL, fake_mesh

CPU = Capacity(prefill_1=400.0, decode_1=20.0, prefill_full=800.0, decode_full=60.0, batch=4)
GPU = Capacity(prefill_1=20000.0, decode_1=150.0, prefill_full=60000.0, decode_full=2400.0, batch=32)
GPU_HW = {"device": "cuda", "name": "NVIDIA H200", "count": 1, "memory_bytes": 150_000_000_000, "dtype": "bfloat16"}


# ------------------------------------------------------------------ the estimate


def test_idle_gpu_estimate_beats_idle_cpu() -> None:
    cpu = estimate(CPU, queue_depth=0, active_streams=0, prompt_tokens=256, max_new_tokens=64)
    gpu = estimate(GPU, queue_depth=0, active_streams=0, prompt_tokens=256, max_new_tokens=64)
    assert gpu.ttft_s < cpu.ttft_s / 10 and gpu.total_s < cpu.total_s / 5
    assert cpu.prefill_s == pytest.approx(256 / 400) and cpu.wait_s == 0.0
    assert cpu.total_s == pytest.approx(cpu.ttft_s + 63 / 20)


def test_a_full_node_waits_and_cached_prefix_shortens_prefill() -> None:
    fast = Capacity(prefill_1=5000.0, decode_1=100.0, prefill_full=5000.0, decode_full=100.0, batch=1)
    idle = estimate(fast, queue_depth=0, active_streams=0, prompt_tokens=100, max_new_tokens=64)
    busy = estimate(fast, queue_depth=1, active_streams=1, prompt_tokens=100, max_new_tokens=64)
    assert idle.wait_s == 0 and busy.wait_s == pytest.approx(2 * 64 / 100)
    assert busy.total_s > idle.total_s + 1.0
    cached = estimate(CPU, queue_depth=0, active_streams=0, prompt_tokens=1000, cached_tokens=900, max_new_tokens=8)
    cold = estimate(CPU, queue_depth=0, active_streams=0, prompt_tokens=1000, max_new_tokens=8)
    assert cached.prefill_s == pytest.approx(cold.prefill_s / 10)
    # the router's in-flight count stands in for streams the advert does not show yet
    assert estimate(fast, queue_depth=0, active_streams=0, inflight=2, prompt_tokens=100,
                    max_new_tokens=64).wait_s == busy.wait_s


def test_per_stream_rate_interpolates_between_batch_one_and_full() -> None:
    assert CPU.decode_per_stream(1) == pytest.approx(20.0)
    assert CPU.decode_per_stream(4) == pytest.approx(15.0)
    assert CPU.decode_per_stream(2) == pytest.approx((20 + (60 - 20) / 3) / 2)
    assert CPU.decode_per_stream(9) == pytest.approx(15.0)  # past the batch: slots, not streams


async def test_calibration_measures_a_fake_engine_within_its_budget() -> None:
    slow, fast = FakeEngine(token_delay=0.02, max_batch_size=4), FakeEngine(token_delay=0.002, max_batch_size=4)
    started = time.monotonic()
    cap_slow, cap_fast = await calibrate(slow, budget_s=2.0), await calibrate(fast, budget_s=2.0)
    assert time.monotonic() - started < 4.0
    assert cap_slow is not None and cap_fast is not None
    assert 30 < cap_slow.decode_1 < 60 and cap_fast.decode_1 > 3 * cap_slow.decode_1
    assert cap_slow.batch == 4 and cap_slow.decode_full > 2 * cap_slow.decode_1  # the fake runs the batch in parallel
    assert await calibrate(FakeEngine(token_delay=0.5), budget_s=0.2) is None  # over budget: nothing claimed


def test_hardware_comes_from_engine_metadata_without_torch() -> None:
    meta = {"dtype": "bfloat16", "device": {"type": "cuda", "name": "NVIDIA H200", "count": 1,
                                            "memory_bytes": 150_000_000_000}}
    assert detect_hardware(meta) == GPU_HW
    assert detect_hardware({"device": {"type": "cpu", "memory_bytes": -5}}) == {"device": "cpu", "count": 1,
                                                                              "name": None, "dtype": None}


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(("body", "field"), [
    ({"capacity": {**CPU.to_body(), "decode_1": 1e12}}, "capacity.decode_1"),
    ({"capacity": {**CPU.to_body(), "prefill_1": -1}}, "capacity.prefill_1"),
    ({"capacity": {**CPU.to_body(), "decode_full": "fast"}}, "capacity.decode_full"),
    ({"capacity": {**CPU.to_body(), "batch": 0}}, "capacity.batch"),
    ({"capacity": {**CPU.to_body(), "batch": 2.5}}, "capacity.batch"),
    ({"capacity": {**CPU.to_body(), "gpus": 8}}, "capacity"),
    ({"capacity": {**CPU.to_body(), "source": "trust-me"}}, "capacity.source"),
    ({"capacity": [1, 2]}, "capacity"),
    ({"hardware": {"device": "x" * 500}}, "hardware.device"),
    ({"hardware": {"device": "cuda", "memory_bytes": -1}}, "hardware.memory_bytes"),
    ({"hardware": {"device": "cuda", "count": 10**9}}, "hardware.count"),
    ({"hardware": {"device": "cuda", "flops": 1}}, "hardware"),
    ({"prefixes": {"block": 128, "hashes": "AAAA"}}, "prefixes.hashes"),  # 3 bytes: not whole hashes
    ({"prefixes": {"block": 128, "hashes": "A" * 20000}}, "prefixes.hashes"),  # over the summary bound
    ({"prefixes": {"block": 3, "hashes": ""}}, "prefixes.block"),
    ({"prefixes": {"block": 128, "hashes": "", "extra": 1}}, "prefixes"),
    ({"load": {"tokens_per_s": -3.0}}, "load.tokens_per_s"),
    ({"load": {"active_streams": -1}}, "load.active_streams"),
])
def test_malformed_fields_are_rejected_with_the_field_named(body: dict, field: str) -> None:
    good = NodeAdvert(node_id="n", did="did:key:z", epoch=1.0, seq=1, models=("m",), capacity=CPU).to_body()
    assert NodeAdvert.from_body(good).capacity == CPU
    with pytest.raises(AdvertFieldError) as info:
        NodeAdvert.from_body({**good, **body})
    assert info.value.field == field and info.value.reason == "malformed_advert"


def test_non_finite_numbers_are_refused() -> None:
    assert not math.isfinite(float("nan"))
    with pytest.raises(AdvertFieldError):
        Capacity.from_body({**CPU.to_body(), "decode_1": float("nan")})
    with pytest.raises(AdvertFieldError):
        Capacity.from_body({**CPU.to_body(), "prefill_1": float("inf")})
    assert parse_hardware(None) == {}


# ------------------------------------------------------------------ on a broker


@pytest.mark.parametrize("kind", BROKER_PARAMS)
async def test_an_idle_gpu_node_is_chosen_over_an_idle_cpu_node_from_the_first_request(kind: str) -> None:
    async with fake_mesh(kind) as env:
        cpu = await env.node(capacity=CPU, hardware={"device": "cpu", "dtype": "float32"})
        await asyncio.sleep(0)  # the CPU node is up first: the older node, favoured by the composite score
        gpu = await env.node(capacity=GPU, hardware=GPU_HW)
        mesh = await env.router()
        await mesh.wait_for_nodes(2, model=MODEL)
        views = mesh.ranked(MODEL)
        assert [v.advert.node_id for v in views] == [gpu.node_id, cpu.node_id]
        assert views[0].advert.hardware["device"] == "cuda" and views[0].advert.capacity.source == "declared"
        assert views[0].estimate is not None and views[0].estimate.total_s < views[1].estimate.total_s
        result = await mesh.generate(prompt="hello", max_new_tokens=8, model=MODEL)
        assert result.text == "Echo: he"
        assert (gpu.served, cpu.served) == (1, 0)


@pytest.mark.parametrize("kind", BROKER_PARAMS)
async def test_calibrated_capacity_is_advertised_and_the_faster_node_wins(kind: str) -> None:
    async with fake_mesh(kind) as env:
        slow = await env.node(FakeEngine(token_delay=0.02, max_batch_size=2), calibrate=True)
        fast = await env.node(FakeEngine(token_delay=0.002, max_batch_size=2), calibrate=True)
        mesh = await env.router()
        await mesh.wait_for_nodes(2, model=MODEL)
        caps = {v.advert.node_id: v.advert.capacity for v in mesh.ranked(MODEL)}
        assert caps[slow.node_id].source == "calibration" and caps[fast.node_id].decode_1 > 3 * caps[slow.node_id].decode_1
        await mesh.generate(prompt="hi", max_new_tokens=4, model=MODEL)
        assert (fast.served, slow.served) == (1, 0)


@pytest.mark.parametrize("kind", BROKER_PARAMS)
async def test_a_busy_fast_node_loses_to_a_free_one_when_the_estimate_says_so(kind: str) -> None:
    fast_cap = Capacity(prefill_1=5000.0, decode_1=100.0, prefill_full=5000.0, decode_full=100.0, batch=1)
    free_cap = Capacity(prefill_1=5000.0, decode_1=40.0, prefill_full=10000.0, decode_full=120.0, batch=4)
    async with fake_mesh(kind) as env:
        fast = await env.node(FakeEngine(reply="x" * 64, token_delay=0.05), capacity=fast_cap)
        free = await env.node(FakeEngine(reply="x" * 64, token_delay=0.05), capacity=free_cap)
        mesh = await env.router()
        await mesh.wait_for_nodes(2, model=MODEL)
        # 64 tokens: fast idle 0.64 s, fast with 1 ahead 1.28 s, with 2 ahead 1.92 s; free idle 1.6 s
        streams, firsts = [], []
        for i in range(3):
            first = asyncio.Event()

            async def run(first: asyncio.Event = first, i: int = i) -> str:
                text = ""
                async for chunk in mesh.stream(GenerationRequest(prompt=f"r{i}", max_new_tokens=64, model=MODEL)):
                    text += chunk.text
                    first.set()
                return text

            streams.append(asyncio.ensure_future(run()))
            firsts.append(first)
            await asyncio.wait_for(first.wait(), 10)
        assert (fast.active, free.active) == (2, 1)
        views = {v.advert.node_id: v for v in mesh.ranked(MODEL)}
        assert views[fast.node_id].estimate.wait_s > 0 and views[free.node_id].estimate.wait_s == 0
        assert [t for t in await asyncio.gather(*streams)] == ["x" * 64] * 3


@pytest.mark.parametrize("kind", BROKER_PARAMS)
async def test_a_malformed_advert_is_rejected_and_its_node_gets_no_traffic(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    async with fake_mesh(kind) as env:
        good = await env.node(capacity=CPU)
        mesh = await env.router()
        await mesh.wait_for_nodes(1, model=MODEL)
        liar = Key.generate()
        client = SecureClient(env.broker.url, liar, **env.broker.credentials(liar))
        await client.connect()
        try:
            node_id = client_token(liar.did)
            advert = NodeAdvert(node_id=node_id, did=liar.did, epoch=time.time(), seq=1, models=(MODEL,),
                                load=NodeLoad(max_batch_size=64), interval_s=0.5).to_body()
            advert["capacity"] = {**GPU.to_body(), "decode_1": 1e15}
            before = mesh.counters["adverts_rejected"]
            with caplog.at_level(logging.WARNING):
                await client.publish(mesh_topics.inference_ad(node_id), advert, type=ADVERT, retain=True, ttl=30,
                                     credentials=[env.issuer.node(liar, models=[MODEL])])
                await until(lambda: mesh.counters["adverts_rejected"] > before, timeout=10)
            assert "capacity.decode_1" in caplog.text
            assert mesh.table.get(node_id) is None
            await mesh.generate(prompt="hi", max_new_tokens=2, model=MODEL)
            assert good.served == 1
        finally:
            await client.aclose()


def test_router_config_checks_affinity_slack() -> None:
    with pytest.raises(ValueError):
        RouterConfig(affinity_slack=-1)


def test_nodes_table_shows_the_estimate_within_80_columns() -> None:
    from rich.console import Console

    from sdk.cli.mesh_cmds import nodes_table

    row = {"rank": 10, "node": "node-with-a-rather-long-identifier-0", "models": ["SmolLM2-135M-Instruct"],
           "score": -11.23, "parts": {"throughput": 1.0, "stability": 1.0, "load": 1.0, "latency": 1.0},
           "tokens_per_s": 12345.5, "queue_depth": 10, "active_streams": 12, "uptime_s": 9999, "hardware": GPU_HW,
           "estimate": {"total": 123.3, "wait": 0.2, "prefill": 0.012, "decode": 12.0, "ttft": 0.3}}
    console = Console(width=80, record=True)
    console.print(nodes_table([row, {**row, "estimate": None}], title="nodes"))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "123.3s" in text and "eta" in text
    console = Console(width=200, record=True)
    console.print(nodes_table([row], title="nodes", wide=True))
    wide = console.export_text()
    assert "200ms" in wide and "12ms" in wide and "prefill" in wide and "NVIDIA H200" in wide


def test_policy_weights_parse() -> None:
    import typer

    from sdk.cli.mesh_cmds import parse_weights

    assert parse_weights(["2=10%", "3=2.5"]) == {"2": 10.0, "3": 2.5}
    for bad in ("2", "=10", "2=ten", "2=101%"):
        with pytest.raises(typer.BadParameter):
            parse_weights([bad])


def test_live_figures_refresh_measured_capacity_but_never_declared() -> None:
    from sdk.inference.types import Usage
    from sdk.mesh.capacity import LiveCapacity

    live = LiveCapacity(CPU)
    live.observe(Usage(prompt_tokens=300, completion_tokens=20, time_to_first_token_s=0.5, tokens_per_s=30.0),
                 streams=1)
    assert live.capacity is not None and live.capacity.source == "live"
    assert live.capacity.decode_1 == pytest.approx(0.8 * 20 + 0.2 * 30)
    assert live.capacity.prefill_1 == pytest.approx(0.8 * 400 + 0.2 * 600)
    live.observe(Usage(prompt_tokens=10, completion_tokens=20, time_to_first_token_s=0.1, tokens_per_s=10.0),
                 streams=4)
    assert live.capacity.decode_full == pytest.approx(0.8 * 60 + 0.2 * 40)
    declared = LiveCapacity(Capacity(**{**CPU.to_body(), "source": "declared"}))
    declared.observe(Usage(prompt_tokens=300, completion_tokens=20, time_to_first_token_s=0.5, tokens_per_s=1e6),
                     streams=1)
    assert declared.capacity is not None and declared.capacity.decode_1 == 20.0
