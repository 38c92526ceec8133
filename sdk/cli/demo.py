"""``autoglm demo``: embedded broker + coordinator + simulated devices, shown live with Rich.

Scenario (every step must succeed for exit 0): start the broker and the coordinator; a
display, a phone and a tablet authenticate (mutual DID + VP); the display announces an
800x600 screen; the phone in the same room applies the companion-layout config (convergence
time shown); the tablet announces its input methods and a model on the inference mesh picks
its layout (a rule with ``policy = "model"``: the bundled SmolLM2 when torch and the model are
installed, else a stand-in engine; the coordinator asks as a mesh peer with its own access
credential, and the version records model, version and prompt hash); a forged config is
refused by the phone; the tablet's credential is revoked, it is disconnected from coordination
and refused when it tries again.
No set-up: temp dirs, generated keys and credentials. Needs no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

log = logging.getLogger(__name__)

DEMO_RULES = """
[[rules]]
name = "phone-companion-layout"
event = "screen_available"
[rules.when]
"sender.kind" = "display"
"event.width" = { gte = 320 }
[rules.target]
select = "group"
group_prefix = "room:"
[rules.target.where]
"device.kind" = "phone"
[rules.config]
"ui.layout" = "companion"
"ui.companion.resolution" = "{event.width}x{event.height}"
"ui.companion.width" = "{event.width}"
"ui.companion.height" = "{event.height}"
"ui.companion.display" = "{sender.did}"

[[rules]]
name = "tablet-layout-by-model"
event = "input_methods"
policy = "model"
[rules.when]
"sender.kind" = "tablet"
[rules.target]
select = "sender"
[rules.model]
prompt = "A tablet with a {sender.attributes.screen} screen offers input {event.methods}. The user's habits: {habits}. Choose its layout."
schema = { type = "object", properties = { "ui.layout" = { enum = ["compact", "companion", "standalone"] } }, required = ["ui.layout"], additionalProperties = false }
timeout = 20.0
max_tokens = 32
[rules.config]
"ui.layout" = "standalone"
"""
#: What the demo's stand-in "model" answers (no model installed).
FAKE_CHOICE = '{"ui.layout": "compact"}'
#: Seconds the model step may take (loading SmolLM2 on a busy CPU included).
MODEL_STEP_TIMEOUT = 120.0


class DemoFailed(Exception):
    """A scenario step failed; ``step`` names it."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step


@dataclass
class Step:
    """One line of the live view."""

    name: str
    status: str = "pending"        # pending | running | ok | failed
    detail: str = ""
    ms: float | None = None


@dataclass
class DemoResult:
    """What the scenario measured."""

    ok: bool
    failed_step: str | None = None
    error: str | None = None
    steps: list[Step] = field(default_factory=list)
    convergence_ms: float | None = None
    auth_ms: list[float] = field(default_factory=list)
    log: list[str] = field(default_factory=list)


class _View:
    def __init__(self, steps: list[Step], console: Console) -> None:
        self.steps = steps
        self.console = console
        self.lines: list[str] = []

    def render(self) -> Group:
        table = Table(title="Open-AutoGLM coordination demo", expand=False)
        table.add_column("step")
        table.add_column("status")
        table.add_column("time", justify="right")
        table.add_column("detail", overflow="fold", max_width=70)
        marks = {"pending": "[dim]…[/dim]", "running": "[yellow]running[/yellow]",
                 "ok": "[green]✔ ok[/green]", "failed": "[red]✘ failed[/red]"}
        for s in self.steps:
            table.add_row(s.name, marks[s.status], "" if s.ms is None else f"{s.ms:.2f} ms", s.detail)
        log_text = Text("\n".join(self.lines[-8:]) or "…", style="cyan")
        return Group(table, Panel(log_text, title="mesh events", expand=False))

    def note(self, line: str) -> None:
        self.lines.append(line)


class StandInEngine:
    """The model step's engine where no model is installed: answers every prompt with ``reply``
    in one chunk. The engine interface a mesh node needs, in miniature (``metadata``, ``encode``,
    ``stream``, ``stats``); ``sdk.testing.FakeEngine`` is the full one, for test suites."""

    tokenizer = None
    #: Advertised so the coordinator's constrained request is routed here: the fixed reply is
    #: an instance of the demo rule's schema (the coordinator validates every answer anyway).
    features = ("json_object", "json_schema")

    def __init__(self, reply: str, *, name: str = "stand-in-layout-model") -> None:
        self.reply = reply
        self.metadata: dict[str, Any] = {"name": name, "version": "1", "framework": "none", "dtype": "none",
                                         "device": {"type": "cpu", "name": "stand-in", "count": 1}}

    def encode(self, request: Any) -> list[int]:
        """Code points of the prompt (its messages' contents), as token ids."""
        text = request.prompt or "".join(str(m.get("content", "")) for m in request.messages or ())
        return [ord(c) for c in text[:4096]] or [32]

    async def stream(self, request: Any) -> AsyncIterator[Any]:
        """The whole reply as one finished chunk."""
        from sdk.inference.types import TokenChunk, Usage

        ids = [ord(c) for c in self.reply]
        yield TokenChunk(text=self.reply, token_ids=ids, finish_reason="stop",
                         usage=Usage(prompt_tokens=len(request.prompt_token_ids or ()), completion_tokens=len(ids),
                                     time_to_first_token_s=0.0, tokens_per_s=0.0))

    def stats(self) -> dict[str, Any]:
        """Idle load figures."""
        return {"queue_depth": 0, "active_streams": 0, "max_batch_size": 1, "tokens_per_s": 0.0,
                "free_cache_tokens": 4096}

    async def aclose(self) -> None:
        """Nothing to release."""


async def _model_engine(model: str) -> tuple[Any, str]:
    """The engine of the model step and a note: ``smollm2`` / ``auto`` try the bundled SmolLM2 on
    CPU (``auto`` takes the :class:`StandInEngine` when torch or the model is missing), ``fake``
    is the stand-in."""
    if model not in ("auto", "fake", "smollm2"):
        raise ValueError(f"model must be auto, fake or smollm2, got {model!r}")
    if model != "fake":
        try:
            from sdk.inference import Engine, EngineConfig

            engine = await Engine.start(EngineConfig(device="cpu", dtype="float32", max_batch_size=1,
                                                     max_sequence_length=1024, warmup=False))
            return engine, "bundled SmolLM2"
        except Exception as exc:  # torch missing, model missing, load failure: all mean "use the fake"
            if model == "smollm2":
                raise
            log.info("demo model step uses the stand-in engine: %s", exc)
            return StandInEngine(FAKE_CHOICE), f"stand-in engine, no SmolLM2: {type(exc).__name__}"
    return StandInEngine(FAKE_CHOICE), "stand-in engine"


async def run_demo(*, console: Console | None = None, keep_running: bool = False,
                   data_dir: Path | None = None, live: bool = True, rules_toml: str = DEMO_RULES,
                   step_timeout: float = 15.0, model: str = "auto") -> DemoResult:
    """Run the scenario; returns a :class:`DemoResult` (never raises for a failed step).

    ``rules_toml`` replaces the demo's rules (the phone step expects an 800x600 companion layout,
    the model step a config for the tablet). ``model``: ``auto`` (SmolLM2 if installed, else a
    stand-in engine), ``fake`` (the stand-in) or ``smollm2``.
    """
    from brokers.embedded import OPEN_ACL, EmbeddedBroker
    from sdk.coord import protocol
    from sdk.coord.coordinator import Coordinator, parse_rules
    from sdk.coord.coordinator.errors import AdmissionError
    from sdk.coord.device import REVOKED, Device
    from sdk.coord.events import screen_available
    from sdk.identity import Key, TrustPolicy
    from sdk.messaging.client import SecureClient

    console = console or Console(emoji=False)
    names = ["start embedded broker", "start coordinator", "authenticate devices",
             "display announces 800x600", "phone applies companion config", "model picks the tablet layout",
             "forged config refused", "revoke tablet", "revoked tablet refused"]
    steps = [Step(n) for n in names]
    view = _View(steps, console)
    result = DemoResult(ok=False, steps=steps, log=view.lines)
    tmp = tempfile.TemporaryDirectory(prefix="autoglm-demo-")
    workdir = data_dir or Path(tmp.name)
    cleanup: list[Callable[[], Awaitable[Any]]] = []
    live_view = Live(view.render(), console=console, refresh_per_second=12, transient=False) if live else None

    def refresh() -> None:
        if live_view is not None:
            live_view.update(view.render())

    async def step(i: int, fn: Callable[[], Awaitable[str]]) -> None:
        s = steps[i]
        s.status = "running"
        refresh()
        t0 = time.perf_counter()
        try:
            s.detail = await asyncio.wait_for(fn(), max(step_timeout, MODEL_STEP_TIMEOUT)
                                              if fn.__name__ == "model_layout" else step_timeout)
        except Exception as exc:
            s.status, s.ms = "failed", (time.perf_counter() - t0) * 1000
            s.detail = f"{type(exc).__name__}: {exc}"
            refresh()
            raise DemoFailed(s.name, s.detail) from exc
        s.status = "ok"
        if s.ms is None:
            s.ms = (time.perf_counter() - t0) * 1000
        refresh()

    broker = EmbeddedBroker(acl=OPEN_ACL)
    issuer, ckey = Key.generate(), Key.generate()
    keys = {"display": Key.generate(), "phone": Key.generate(), "tablet": Key.generate()}
    devices: dict[str, Device] = {}
    applied: list[Any] = []
    tablet_applied: list[Any] = []
    converged: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    coordinator: Coordinator | None = None

    def on_coord(what: str, info: dict[str, Any]) -> None:
        short = {v.did: k for k, v in keys.items()}
        who = short.get(info.get("did", ""), info.get("did", "")[:24])
        if what == "converged" and not converged.done():
            converged.set_result(info)
        line = {
            "admitted": lambda: f"admitted {who} ({info.get('kind')}), last version {info.get('last_version')}",
            "refused": lambda: f"refused {who}: {info.get('reason')}",
            "revoked": lambda: f"revoked {who}: disconnected from coordination",
            "rejected": lambda: f"rejected {info.get('type')} from {who}: {info.get('reason')}",
            "event": lambda: f"event {info.get('type')} {info.get('fields')} from {who} -> "
                             f"{len(info.get('targets', []))} target(s)",
            "report": lambda: f"{who} reports v{info.get('version')} {info.get('status')}",
            "converged": lambda: f"converged in {info['seconds'] * 1000:.2f} ms "
                                 f"({info.get('targets')} target(s), {info.get('failures')} failure(s))",
        }.get(what)
        if line is not None:
            view.note(line())
            refresh()

    try:
        if live_view is not None:
            live_view.start()

        async def start_broker() -> str:
            await broker.start()
            cleanup.append(broker.stop)
            return f"amqtt on {broker.url} (DID-authenticated CONNECT)"

        async def start_coordinator() -> str:
            nonlocal coordinator
            rules = parse_rules(tomllib.loads(rules_toml).get("rules", []))
            coordinator = Coordinator(ckey, broker=broker.url, data_dir=workdir / "coordinator",
                                      trust=TrustPolicy({}), issuer=issuer, rules=rules)
            coordinator.add_listener(on_coord)
            await coordinator.start()
            cleanup.append(coordinator.stop)
            return f"{ckey.did[:32]}… data in {workdir}"

        async def authenticate() -> str:
            assert coordinator is not None
            profiles = {"display": ("display", ["room:living"]), "phone": ("phone", ["room:living"]),
                        "tablet": ("tablet", ["room:living"])}
            parts = []
            for name, (kind, groups) in profiles.items():
                cred = coordinator.issue_device_credential(keys[name].did, kind=kind, groups=groups, name=name)
                dev = Device(keys[name], cred, broker=broker.url, coordinator=ckey.did,
                             on_config={"phone": applied.append, "tablet": tablet_applied.append}.get(name),
                             attributes={"screen": "10-inch"} if name == "tablet" else None)
                await dev.connect(authenticate=False)
                cleanup.append(dev.aclose)
                t0 = time.perf_counter()
                await dev.authenticate()
                ms = (time.perf_counter() - t0) * 1000
                result.auth_ms.append(ms)
                devices[name] = dev
                parts.append(f"{name} {ms:.1f} ms")
            return "mutual DID+VP: " + ", ".join(parts)

        async def announce() -> str:
            await devices["display"].publish_event(screen_available(800, 600, density=160))
            return "display → screen_available {width: 800, height: 600, density: 160}"

        async def phone_applies() -> str:
            info = await converged
            await devices["phone"].wait_version(1)
            cfg = applied[-1]
            if cfg.state.get("ui.companion.resolution") != "800x600" or cfg.state.get("ui.layout") != "companion":
                raise RuntimeError(f"unexpected config {cfg.state}")
            result.convergence_ms = info["seconds"] * 1000
            steps[4].ms = result.convergence_ms
            return (f"phone config v{cfg.version}: layout=companion resolution=800x600; "
                    f"convergence {result.convergence_ms:.2f} ms (event → all targets applied)")

        async def model_layout() -> str:
            from sdk.coord.events import input_methods
            from sdk.mesh import (
                ACCESS_CREDENTIAL,
                AccessPolicy,
                MeshNode,
                NodeConfig,
                NodePolicy,
                issue_access_credential,
                issue_node_credential,
            )
            from sdk.mesh.advisor import MeshAdvisor

            assert coordinator is not None and coordinator.store is not None
            engine, which = await _model_engine(model)
            cleanup.append(engine.aclose)
            name = str(engine.metadata.get("name") or "model")
            node_key = Key.generate()
            node = MeshNode(engine, broker.url, key=node_key, access=AccessPolicy(TrustPolicy({issuer.did: {
                ACCESS_CREDENTIAL}})), credential=issue_node_credential(issuer, node_key.did, models=[name],
                                                                        node_ids=["demo-node"]),
                config=NodeConfig(node_id="demo-node", model_name=name, advert_interval=1.0))
            await node.start()
            cleanup.append(node.aclose)
            access = issue_access_credential(issuer, ckey.did, models=[name])     # the coordinator, a mesh peer
            advisor = MeshAdvisor.connect(broker.url, ckey, credential=access, model=name,
                                          node_policy=NodePolicy.trusting(issuer.did))
            await advisor.start()
            cleanup.append(advisor.aclose)
            await advisor.backend.wait_for_nodes(1, model=name, timeout=step_timeout)
            coordinator.model_policy.advisor = advisor
            tablet = devices["tablet"]
            t0 = time.perf_counter()
            await tablet.publish_event(input_methods(["touch", "pen"]))
            await tablet.wait_version(1, MODEL_STEP_TIMEOUT)
            ms = (time.perf_counter() - t0) * 1000
            steps[5].ms = ms
            layout = tablet_applied[-1].state.get("ui.layout")
            origin = coordinator.store.history(tablet.did, limit=1)[0].get("origin") or {}
            if origin.get("policy") == "model":
                return (f"tablet layout={layout} chosen by {origin['model']} {origin['model_version']} "
                        f"({which}, over the mesh; prompt {origin['prompt_hash'][:19]}…) in {ms:.0f} ms")
            if origin.get("policy") == "fallback":
                return f"tablet layout={layout}: fallback config ({origin.get('reason')}; {which}) in {ms:.0f} ms"
            raise RuntimeError(f"the tablet's config records no model origin: {origin}")

        async def forged() -> str:
            mallory = Key.generate()
            phone = devices["phone"]
            async with SecureClient(broker.url, mallory) as client:
                body = {"device": phone.did, "version": 99, "changes": {"ui.layout": "evil"},
                        "state": {"ui.layout": "evil"}, "event_id": None, "rules": [], "created": 0}
                await client.publish(protocol.device_config(phone.token), body, type="coord.config", qos=1)
                for _ in range(100):
                    if phone.rejected_configs:
                        break
                    await asyncio.sleep(0.02)
            if not phone.rejected_configs or phone.last_version != 1:
                raise RuntimeError("the forged config was not refused")
            return f"config signed by an outsider refused by the phone ({phone.rejected_configs[-1]})"

        async def revoke() -> str:
            assert coordinator is not None
            tablet = devices["tablet"]
            t0 = time.perf_counter()
            await coordinator.revoke(tablet.did)
            for _ in range(100):
                if tablet.state == REVOKED:
                    break
                await asyncio.sleep(0.01)
            if tablet.state != REVOKED:
                raise RuntimeError("tablet was not disconnected from coordination")
            ms = (time.perf_counter() - t0) * 1000
            steps[7].ms = ms
            return f"status list updated and published; tablet disconnected in {ms:.1f} ms"

        async def refused() -> str:
            tablet = devices["tablet"]
            try:
                await tablet.authenticate()
            except AdmissionError as exc:
                if exc.reason != "revoked":
                    raise RuntimeError(f"refused for the wrong reason: {exc.reason}") from exc
                return f"re-authentication refused: reason={exc.reason}"
            raise RuntimeError("a revoked tablet was admitted")

        for i, fn in enumerate([start_broker, start_coordinator, authenticate, announce, phone_applies,
                                model_layout, forged, revoke, refused]):
            await step(i, fn)
        result.ok = True
        if keep_running:
            view.note(f"mesh up on {broker.url}; Ctrl-C to stop")
            refresh()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
    except DemoFailed as exc:
        result.failed_step, result.error = exc.step, str(exc)
    finally:
        for fn in reversed(cleanup):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(fn(), 5)
        if live_view is not None:
            live_view.update(view.render())
            live_view.stop()
        tmp.cleanup()
    return result


__all__ = ["run_demo", "DemoResult", "DemoFailed", "Step", "StandInEngine", "DEMO_RULES", "FAKE_CHOICE"]
