"""Where a mesh request's time goes, hop by hop (the breakdown in docs/MESH.md).

    python3 bench/mesh_hops.py [--requests 40]

Router here, one node in a child process (as ``mesh_bench.py --split``), loopback Mosquitto,
one-token greedy requests. Both processes wrap the steps on the path (seal, verify, socket
writes and reads, dispatch, admission, the engine stream) with ``time.perf_counter_ns()`` marks
(CLOCK_MONOTONIC: one clock for both processes); the node reports its marks through a file.
Prints the median of each hop over the requests and their sum. The engine's own part (tokenize
→ first chunk) is left out, as in the bench's paired figure. Instrumentation, not a benchmark:
the wrappers cost a few µs each.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import inspect
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MARKS: list[tuple[str, int]] = []

# (label, first mark, second mark); "|" marks the engine's part (not counted)
HOPS = [
    ("router: request checks, model, choice of node", "R REQ", "R Mesh._choose<"),
    ("router: request body, reply stream set-up", "R Mesh._choose<", "R Signer.seal>"),
    ("router: seal", "R Signer.seal>", "R Signer.seal<"),
    ("router: hand to paho + socket write", "R Signer.seal<", "R MqttTransport._flush<"),
    ("broker -> node readable", "R MqttTransport._flush<", "N MqttTransport._on_readable>"),
    ("node: paho read + MQTT parse", "N MqttTransport._on_readable>", "N Verifier.open>"),
    ("node: verify + decrypt", "N Verifier.open>", "N Verifier.open<"),
    ("node: dispatch + handler task start", "N Verifier.open<", "N MeshNode._handle>"),
    ("node: admission", "N MeshNode._handle>", "N Engine.encode>"),
    ("node: chunk body, hand-over from the engine stream", "|N engine.yield", "|N Signer.seal>"),
    ("node: seal", "|N Signer.seal>", "|N Signer.seal<"),
    ("node: hand to paho + socket write", "|N Signer.seal<", "|N MqttTransport._flush<"),
    ("broker -> router readable", "|N MqttTransport._flush<", "|R MqttTransport._on_readable>"),
    ("router: paho read + MQTT parse", "|R MqttTransport._on_readable>", "|R Verifier.open>"),
    ("router: verify + decrypt", "|R Verifier.open>", "|R Verifier.open<"),
    ("router: reply routing", "|R Verifier.open<", "|R SecureClient._on_reply<"),
    ("router: hand-over to the caller", "|R SecureClient._on_reply<", "|R FIRST"),
]


def mark(name: str) -> None:
    MARKS.append((name, time.perf_counter_ns()))


def wrap(cls: Any, attr: str) -> None:
    """Mark entry (``name>``) and exit (``name<``) of ``cls.attr``."""
    fn = getattr(cls, attr)
    name = f"{cls.__name__}.{attr}"
    if inspect.iscoroutinefunction(fn):
        @functools.wraps(fn)
        async def awrapped(*a: Any, **k: Any) -> Any:
            mark(name + ">")
            try:
                return await fn(*a, **k)
            finally:
                mark(name + "<")
        setattr(cls, attr, awrapped)
    else:
        @functools.wraps(fn)
        def wrapped(*a: Any, **k: Any) -> Any:
            mark(name + ">")
            try:
                return fn(*a, **k)
            finally:
                mark(name + "<")
        setattr(cls, attr, wrapped)


def instrument_messaging() -> None:
    from sdk.messaging import client, envelope, transport

    wrap(envelope.Signer, "seal")
    wrap(envelope.Verifier, "open")
    wrap(transport.MqttTransport, "_on_readable")
    wrap(transport.MqttTransport, "_flush")
    wrap(client.SecureClient, "_on_reply")


async def serve_node(url: str, trust: str, marks_path: str, identity: str) -> None:
    """Child: one instrumented node; writes its marks to ``marks_path`` every 0.2 s."""
    instrument_messaging()
    from sdk.identity import TrustPolicy
    from sdk.inference import Engine, EngineConfig
    from sdk.mesh import ACCESS_CREDENTIAL, AccessPolicy, MeshNode, NodeConfig, RateLimit
    from sdk.mesh import node as node_module

    engine = await Engine.start(EngineConfig(max_sequence_length=512, max_batch_size=4))
    wrap(node_module.MeshNode, "_handle")
    wrap(Engine, "encode")
    original = Engine.stream

    async def stream(self: Any, request: Any) -> Any:
        async for chunk in original(self, request):
            mark("engine.yield")
            yield chunk

    Engine.stream = stream  # type: ignore[method-assign]
    from bench.mesh_bench import node_identity

    access = AccessPolicy(TrustPolicy({trust: {ACCESS_CREDENTIAL}}))
    key, credential = node_identity(identity)
    node = MeshNode(engine, url, key=key, access=access, credential=credential,
                    config=NodeConfig(node_id="hops-0", advert_interval=1.0, rate_limit=RateLimit(100, 100)))
    await node.start()
    print("READY", flush=True)
    while True:
        await asyncio.sleep(0.2)
        with open(marks_path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(MARKS, f)
        os.replace(marks_path + ".tmp", marks_path)


async def run(n: int) -> list[list[tuple[int, str]]]:
    from bench.mesh_bench import write_node_identity
    from bench.mqtt_raw_bench import loopback_mosquitto
    from sdk.identity import Key
    from sdk.inference import GenerationRequest
    from sdk.mesh import Mesh, NodePolicy, issue_access_credential
    from sdk.mesh import router as router_module

    with loopback_mosquitto() as url, tempfile.TemporaryDirectory() as tmp:
        issuer, peer = Key.generate(), Key.generate()
        vc = issue_access_credential(issuer, peer.did)
        marks_path = os.path.join(tmp, "node_marks.json")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), "--serve-node", url, "--trust", issuer.did,
            "--marks", marks_path, "--node-identity", write_node_identity(issuer, "hops-0", tmp),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 300)
            assert line.strip() == b"READY", line
            instrument_messaging()
            wrap(router_module.Mesh, "_choose")
            async with Mesh(url, peer, credentials=[vc], node_policy=NodePolicy.trusting(issuer.did)) as mesh:
                await mesh.wait_for_nodes(1)
                warm = GenerationRequest(prompt="warm up", max_new_tokens=2, temperature=0.0)
                for _ in range(3):
                    await mesh.generate(warm)
                await asyncio.sleep(0.3)
                MARKS.clear()
                for i in range(n):
                    prompt = f"Chapter {i}. Once upon a time, in a small village by the sea, there lived"
                    req = GenerationRequest(prompt=prompt, max_new_tokens=1, temperature=0.0)
                    mark("REQ")
                    async for chunk in mesh.stream(req):
                        if chunk.token_ids:
                            mark("FIRST")
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
            with open(marks_path, encoding="utf-8") as f:
                node_marks = json.load(f)
        finally:
            proc.kill()
            await proc.wait()
    timeline = sorted([(t, "R " + n) for n, t in MARKS] + [(t, "N " + n) for n, t in node_marks])
    requests: list[list[tuple[int, str]]] = []
    for t, name in timeline:
        if name == "R REQ":
            requests.append([])
        if requests:
            requests[-1].append((t, name))
    return requests


def hops(requests: list[list[tuple[int, str]]]) -> list[tuple[str, float]]:
    """Median µs per hop: the first occurrence of each mark, before / after the engine's first chunk."""
    per_hop: dict[str, list[float]] = {label: [] for label, _, _ in HOPS}
    for marks in requests:
        names = [n for _, n in marks]
        if "N engine.yield" not in names or "R FIRST" not in names:
            continue
        split = names.index("N engine.yield")
        first: dict[str, int] = {}
        for i, (t, n) in enumerate(marks):
            first.setdefault(("|" if i >= split else "") + n, t)
        for label, a, b in HOPS:
            if a in first and b in first:
                per_hop[label].append((first[b] - first[a]) / 1e3)
    return [(label, statistics.median(v)) for label, v in per_hop.items() if v]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--serve-node", help=argparse.SUPPRESS)
    parser.add_argument("--trust", help=argparse.SUPPRESS)
    parser.add_argument("--marks", help=argparse.SUPPRESS)
    parser.add_argument("--node-identity", help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.serve_node:
        asyncio.run(serve_node(args.serve_node, args.trust, args.marks, args.node_identity))
        return 0
    rows = hops(asyncio.run(run(args.requests)))
    for label, us in rows:
        print(f"{us:8.1f} us  {label}")
    print(f"{sum(us for _, us in rows):8.1f} us  sum of the medians ({args.requests} one-token requests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
