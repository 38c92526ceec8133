"""`autoglm` commands for the mesh layer: ``gateway``, ``nodes``, and ``serve --broker`` (node mode).

``serve`` is the inference layer's command, re-registered here with the mesh options added: with
``--broker`` the started engine also joins the mesh as a :class:`~sdk.mesh.MeshNode` (through
``run_serve``'s ``attach`` hook); without it, the original command runs unchanged. Every command
checks its broker URL and options before it connects or loads anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import typing
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import typer

from sdk.cli import inference_cmds

log = logging.getLogger(__name__)

BrokerOpt = Annotated[str | None, typer.Option("--broker", help="MQTT broker URL, e.g. mqtt://127.0.0.1:1883.")]
KeystoreOpt = Annotated[
    Path | None, typer.Option("--keystore", help="Keystore file (default $AUTOGLM_KEYSTORE or ~/.autoglm/keystore.json; "
                              "passphrase from $AUTOGLM_PASSPHRASE).")]
KeyNameOpt = Annotated[str | None, typer.Option("--key-name", help="Named key in the keystore (default key if unset).")]
NodeTrustOpt = Annotated[list[str] | None, typer.Option(
    "--node-trust", help="Issuer DID trusted for InferenceNodeCredential (repeatable): only nodes it "
    "credentialed are used.")]


def _broker(url: str) -> str:
    """``--broker`` checked (``mqtt://`` / ``mqtts://`` with a host) before anything starts."""
    from sdk.cli.options import broker_url

    return broker_url(url)


def _node_policy(issuers: list[str] | None, *, required: bool) -> Any:
    """The router's node trust policy from ``--node-trust`` DIDs (None when none are given)."""
    from sdk.mesh import NodePolicy

    if not issuers:
        if required:
            raise typer.BadParameter("name at least one issuer trusted for InferenceNodeCredential",
                                     param_hint="--node-trust")
        return None
    return NodePolicy.trusting(*issuers)


def _load_key(keystore: Path | None, key_name: str | None) -> Any:
    from sdk.identity.keystore import load_key

    return load_key(keystore, name=key_name)


def _read_credential(path: Path) -> Any:
    from sdk.identity import load_credential

    return load_credential(path)


# ------------------------------------------------------------------ serve --broker (node mode)

_MESH_SERVE_PARAMS = [
    inspect.Parameter("broker", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        str | None, typer.Option("--broker", help="Also join the mesh on this MQTT broker (node mode).")]),
    inspect.Parameter("keystore", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=KeystoreOpt),
    inspect.Parameter("key_name", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=KeyNameOpt),
    inspect.Parameter("trust", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        list[str] | None, typer.Option("--trust", help="Issuer DID trusted for InferenceAccessCredential "
                                       "(repeatable; node mode needs at least one).")]),
    inspect.Parameter("node_credential", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Path | None, typer.Option("--node-credential", help="This node's InferenceNodeCredential (JSON or VC-JWT); "
                                  "routers use only credentialed nodes.")]),
    inspect.Parameter("status_file", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Path | None, typer.Option("--status-file", help="JSON {status list URL: status list credential}: a seed "
                                  "until the issuers' live status lists arrive over the broker.")]),
    inspect.Parameter("node_id", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        str | None, typer.Option("--node-id", help="Node id on the mesh (default: the DID's key id).")]),
    inspect.Parameter("advert_interval", inspect.Parameter.KEYWORD_ONLY, default=2.0, annotation=Annotated[
        float, typer.Option("--advert-interval", min=0.1, help="Seconds between adverts.")]),
    inspect.Parameter("peer_rate", inspect.Parameter.KEYWORD_ONLY, default=5.0, annotation=Annotated[
        float, typer.Option("--peer-rate", min=0.001, help="Requests per second each peer may start.")]),
    inspect.Parameter("peer_burst", inspect.Parameter.KEYWORD_ONLY, default=20.0, annotation=Annotated[
        float, typer.Option("--peer-burst", min=1.0, help="Requests a peer may start at once.")]),
]
_MESH_NAMES = {p.name for p in _MESH_SERVE_PARAMS}
_SETTINGS_FIELDS = ("model_path", "device", "dtype", "gpu_memory_utilization", "max_sequence_length", "max_batch_size",
                    "max_queue_size", "host", "port", "served_model_name", "max_concurrent")


def node_attachment(broker: str, key: Any, *, trust: list[str], status: Any = None, credential: Any = None,
                    node_id: str | None = None, advert_interval: float = 2.0, peer_rate: float = 5.0,
                    peer_burst: float = 20.0) -> Any:
    """An ``EngineAttachment`` for ``run_serve``: keeps the engine on the mesh while HTTP serves.

    The node follows the live status lists of every issuer on the broker (``status``, e.g. the
    ``--status-file`` contents, only seeds them) and advertises with ``credential``.
    """
    from sdk.identity import TrustPolicy
    from sdk.mesh import ACCESS_CREDENTIAL, AccessPolicy, MeshNode, NodeConfig, RateLimit

    policy = AccessPolicy(TrustPolicy({did: {ACCESS_CREDENTIAL} for did in trust}), status=status)
    config = NodeConfig(node_id=node_id, advert_interval=advert_interval,
                        rate_limit=RateLimit(rate=peer_rate, burst=peer_burst), calibrate=True,
                        prefix_key=prefix_key_from_env())

    @contextlib.asynccontextmanager
    async def attach(engine: Any) -> AsyncIterator[Any]:
        async with MeshNode(engine, broker, key=key, access=policy, credential=credential, config=config) as node:
            typer.echo(f"mesh node {node.node_id} ({node.did}) serving {node.model} via {broker}", err=True)
            yield node

    return attach


#: The mesh's shared prefix secret (nodes and routers): keys the prefix hashes nodes advertise.
PREFIX_SECRET_ENV = "AUTOGLM_PREFIX_SECRET"


def prefix_key_from_env() -> bytes | None:
    """The mesh prefix key derived from ``$AUTOGLM_PREFIX_SECRET`` (None when unset)."""
    import os

    from sdk.mesh import derive_prefix_key

    secret = os.environ.get(PREFIX_SECRET_ENV)
    if not secret:
        return None
    try:
        return derive_prefix_key(secret)
    except ValueError as exc:
        raise typer.BadParameter(f"${PREFIX_SECRET_ENV}: {exc}") from None


def _serve_with_mesh(**kwargs: Any) -> None:
    mesh = {name: kwargs.pop(name) for name in list(kwargs) if name in _MESH_NAMES}
    if mesh["broker"] is None:
        inference_cmds.serve(**kwargs)
        return
    from sdk.cli.inference_cmds import (
        DEFAULT_GPU_MEMORY_UTILIZATION,
        ServeSettings,
        _run_or_exit,
        api_keys,
        check_engine_options,
        run_serve,
        setup_logging,
    )

    broker = _broker(mesh["broker"])
    if not mesh["trust"]:
        raise typer.BadParameter("node mode needs at least one --trust issuer DID", param_hint="--trust")
    log_level = setup_logging(str(kwargs.get("log_level", "info")))
    check_engine_options(model_path=kwargs["model_path"], device=kwargs["device"], dtype=kwargs["dtype"],
                         max_sequence_length=kwargs["max_sequence_length"],
                         gpu_memory_utilization=kwargs["gpu_memory_utilization"])
    fields = {f: kwargs[f] for f in _SETTINGS_FIELDS if f in kwargs}
    fields["gpu_memory_utilization"] = fields.get("gpu_memory_utilization") or DEFAULT_GPU_MEMORY_UTILIZATION
    settings = ServeSettings(**fields, api_keys=api_keys(kwargs.get("api_key")), log_level=log_level)

    async def main() -> None:
        key = _load_key(mesh["keystore"], mesh["key_name"])
        status = json.loads(mesh["status_file"].read_text(encoding="utf-8")) if mesh["status_file"] else None
        credential = _read_credential(mesh["node_credential"]) if mesh["node_credential"] else None
        attach = node_attachment(broker, key, trust=list(mesh["trust"]), status=status, credential=credential,
                                 node_id=mesh["node_id"], advert_interval=mesh["advert_interval"],
                                 peer_rate=mesh["peer_rate"], peer_burst=mesh["peer_burst"])
        await run_serve(settings, attach=attach)

    _run_or_exit(main())


def _extended_serve() -> Any:
    base = inference_cmds.serve
    hints = typing.get_type_hints(base, include_extras=True)  # the module's annotations are strings
    params = [p.replace(annotation=hints.get(p.name, p.annotation))
              for p in inspect.signature(base).parameters.values()] + _MESH_SERVE_PARAMS

    def serve(**kwargs: Any) -> None:
        _serve_with_mesh(**kwargs)

    serve.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    serve.__doc__ = (base.__doc__ or "").rstrip() + "\n\nWith --broker the engine also joins the inference mesh."
    return serve


# ------------------------------------------------------------------ gateway


def gateway(
    broker: Annotated[str, typer.Option("--broker", help="MQTT broker URL of the mesh (mqtt:// or mqtts://).")],
    keystore: KeystoreOpt = None,
    key_name: KeyNameOpt = None,
    credential: Annotated[
        list[Path] | None, typer.Option("--credential", help="InferenceAccessCredential file (JSON or VC-JWT; "
                                        "repeatable).")] = None,
    node_trust: NodeTrustOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to bind (0: any free port).")] = 8000,
    model: Annotated[str | None, typer.Option(help="Model used when several are on the mesh.")] = None,
    first_token_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to the first token.")] = 30.0,
    stall_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds between tokens before failover.")] = 5.0,
    max_concurrent: Annotated[int, typer.Option(min=1, help="HTTP generations in flight.")] = 64,
    api_key: Annotated[list[str] | None, typer.Option(help=inference_cmds.API_KEY_HELP)] = None,
    log_level: Annotated[str, typer.Option(help="Log level: debug, info, warning, error.")] = "info",
    policy_trust: Annotated[list[str] | None, typer.Option(
        "--policy-trust", help="Issuer DID trusted for MeshPolicyCredential: follow the routing policies "
                               "(gray release) its holders publish (repeatable).")] = None,
) -> None:
    """Serve the OpenAI-compatible API (same as `autoglm serve`) backed by the mesh.

    API keys: --api-key (repeatable) and $AUTOGLM_API_KEYS (comma-separated), as for `autoglm serve`.
    No live node for a model: 503 no_node_available; /health is 503 while no node is live."""
    from sdk.cli.inference_cmds import _run_or_exit, api_keys, setup_logging
    from sdk.mesh import RouterConfig
    from sdk.mesh.gateway import run_gateway

    broker = _broker(broker)
    policy = _node_policy(node_trust, required=True)
    level = setup_logging(log_level)
    keys = api_keys(api_key)
    prefix_key = prefix_key_from_env()
    trust_policy = None
    if policy_trust:
        from sdk.identity import TrustPolicy
        from sdk.mesh import POLICY_CREDENTIAL

        trust_policy = TrustPolicy({did: {POLICY_CREDENTIAL} for did in policy_trust})

    async def main() -> None:
        key = _load_key(keystore, key_name)
        creds = [_read_credential(p) for p in credential or []]
        await run_gateway(broker, key, credentials=creds, node_policy=policy,
                          host=host, port=port, default_model=model,
                          config=RouterConfig(first_token_timeout=first_token_timeout, stall_timeout=stall_timeout,
                                              prefix_key=prefix_key),
                          api_keys=keys or None, max_concurrent=max_concurrent, log_level=level,
                          policy_trust=trust_policy)

    _run_or_exit(main())


# ------------------------------------------------------------------ nodes


async def collect_nodes(broker: str, key: Any, *, model: str | None = None, wait: float = 2.5,
                        top: int = 10, node_policy: Any = None) -> list[dict[str, Any]]:
    """Listen to adverts for ``wait`` seconds and return the ranked top ``top`` nodes as dicts
    (only credentialed nodes under ``node_policy``; without one, every well-signed advert)."""
    from sdk.mesh import Mesh

    async with Mesh(broker, key, node_policy=node_policy, require_node_credential=node_policy is not None) as mesh:
        await asyncio.sleep(wait)
        rows = []
        for i, view in enumerate(mesh.ranked(model)[:top], 1):
            a = view.advert
            rows.append({
                "rank": i, "node": a.node_id, "did": a.did, "models": list(a.models),
                "version": a.metadata.get("version"), "score": round(view.rank.score, 4),
                "parts": {k: round(v, 4) for k, v in view.rank.parts.items()},
                "tokens_per_s": round(a.load.tokens_per_s, 2), "queue_depth": a.load.queue_depth,
                "active_streams": a.load.active_streams, "max_batch_size": a.load.max_batch_size,
                "free_cache_tokens": a.load.free_cache_tokens, "uptime_s": round(view.figures.uptime_s, 1),
                "hardware": dict(a.hardware), "features": list(a.features),
                "capacity": a.capacity.to_body() if a.capacity is not None else None,
                "estimate": ({k: round(v, 4) for k, v in view.estimate.parts().items()}
                             if view.estimate is not None else None),
            })
        return rows


#: The ``nodes`` table's columns: (title, right-aligned, shown without ``--wide``).
NODE_COLUMNS: tuple[tuple[str, bool, bool], ...] = (
    ("#", True, True), ("node", False, True), ("models", False, True), ("score", True, True),
    ("throughput", True, False), ("stability", True, False), ("load", True, False), ("latency", True, False),
    ("tok/s", True, True), ("q/act", True, True), ("eta", True, True), ("wait", True, False),
    ("prefill", True, False), ("decode", True, False), ("device", False, False), ("feat", False, True),
    ("uptime", True, True),
)
#: How the short table names the advertised features (others by their own name).
_FEATURE_ABBREVIATIONS = {"json_schema": "S", "json_object": "J", "tools": "T"}


#: ``nodes --wide`` prints at least this wide (the full ids and every part).
WIDE_COLUMNS = 200
_MIN_WIDTHS = {"#": 2, "tok/s": 6, "uptime": 6}


def nodes_table(rows: list[dict[str, Any]], *, title: str, wide: bool = False) -> Any:
    """The ranked nodes as a Rich table: at 80 columns by default (ids shortened), every score part
    and the device with ``wide``."""
    from rich import box
    from rich.table import Table

    legend = None if wide else "feat: " + ", ".join(f"{a} {n}" for n, a in sorted(_FEATURE_ABBREVIATIONS.items(),
                                                                                   key=lambda i: i[1]))
    table = Table(title=title, caption=legend, box=box.SIMPLE_HEAD, show_edge=False, expand=False, pad_edge=False,
                  collapse_padding=True)
    for name, right, narrow in NODE_COLUMNS:
        if narrow or wide:
            short = not wide and name in ("node", "models")
            table.add_column(name, justify="right" if right else "left", no_wrap=True,
                             min_width=max(len(name), _MIN_WIDTHS.get(name, 0)),
                             overflow="ellipsis" if short else "fold", max_width=14 if short else None)
    for r in rows:
        p = r["parts"]
        hw = r["hardware"]
        cells = {
            "#": str(r["rank"]), "node": r["node"], "models": ",".join(r["models"]), "score": f"{r['score']:+.2f}",
            "throughput": f"{p['throughput']:+.2f}", "stability": f"{p['stability']:+.2f}",
            "load": f"{p['load']:+.2f}", "latency": f"{p['latency']:+.2f}", "tok/s": f"{r['tokens_per_s']:.1f}",
            "q/act": f"{r['queue_depth']}/{r['active_streams']}",
            "device": f"{hw.get('device', '?')} {hw.get('name') or ''}".strip(), "uptime": f"{r['uptime_s']:.0f}s",
            "feat": _features(r.get("features") or [], wide),
        }
        est = r.get("estimate")
        for name, part in (("eta", "total"), ("wait", "wait"), ("prefill", "prefill"), ("decode", "decode")):
            cells[name] = _seconds(est[part]) if est else "-"
        table.add_row(*(cells[name] for name, _, narrow in NODE_COLUMNS if narrow or wide))
    return table


def _features(names: list[str], wide: bool) -> str:
    """``json_object,json_schema,tools`` with ``wide``; else ``JST`` (other names in full); ``-`` for none."""
    if not names:
        return "-"
    if wide:
        return ",".join(names)
    return "".join(_FEATURE_ABBREVIATIONS.get(n, f" {n}") for n in names).strip()


def _seconds(value: float) -> str:
    return f"{value * 1000:.0f}ms" if value < 1 else f"{value:.1f}s"


def nodes(
    broker: Annotated[str, typer.Option("--broker", help="MQTT broker URL of the mesh (mqtt:// or mqtts://).")],
    keystore: KeystoreOpt = None,
    key_name: KeyNameOpt = None,
    model: Annotated[str | None, typer.Option(help="Only nodes serving this model.")] = None,
    node_trust: NodeTrustOpt = None,
    wait: Annotated[float, typer.Option(min=0.0, help="Seconds to listen for adverts.")] = 2.5,
    wide: Annotated[bool, typer.Option("--wide", help="Every column (score parts, device) whatever the terminal width.")]
    = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output (errors too).")] = False,
) -> None:
    """Show the mesh's ranked nodes (top 10) with their composite score and, for nodes advertising
    their capacity, the estimated time to complete a 256-token prompt + 128 new tokens (eta) and
    its parts (queue wait, prefill, decode), and the request features each honours (json_object,
    json_schema constrained output, tools: J, S, T in the short table) (with --node-trust only
    the nodes those issuers credentialed; without, every well-signed advert). Every column when the
    terminal is wide enough, else a short table (fits 80 columns); --wide: every column, always."""
    from rich.console import Console
    from rich.measure import Measurement

    from sdk.cli.inference_cmds import _run_or_exit
    from sdk.identity import Key

    broker = _broker(broker)
    policy = _node_policy(node_trust, required=False)
    rows: list[dict[str, Any]] = []

    async def main() -> None:
        key = _load_key(keystore, key_name) if keystore or key_name else Key.generate()  # listing needs no grant
        rows.extend(await collect_nodes(broker, key, model=model, wait=wait, node_policy=policy))

    _run_or_exit(main(), as_json=as_json)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    title = f"mesh nodes on {broker}" + (f" for {model}" if model else "")
    console = Console(emoji=False)
    if not rows:
        console.print("[yellow]no live nodes[/yellow]")
        return
    table = nodes_table(rows, title=title, wide=True)
    if wide:
        console = Console(emoji=False, width=max(console.width, WIDE_COLUMNS))
    elif Measurement.get(console, console.options.update_width(10_000), table).maximum > console.width:
        table = nodes_table(rows, title=title)  # every column would not fit: the short table
    console.print(table)


# ------------------------------------------------------------------ routing policy (gray release)

policy_app = typer.Typer(help="Gray release: send a share of a model's traffic to nodes of one version "
                              "(a signed, retained routing policy the routers follow).", no_args_is_help=True)
PolicyCredentialOpt = Annotated[Path, typer.Option("--credential", help="Your MeshPolicyCredential (JSON or VC-JWT).")]
SeqOpt = Annotated[int | None, typer.Option("--seq", min=1, help="Policy sequence (default: the time in ms; "
                                                                    "routers keep the highest).")]


def parse_weights(values: list[str]) -> dict[str, float]:
    """``["2=10%", "3=5"]`` -> ``{"2": 10.0, "3": 5.0}``; ``BadParameter`` when malformed."""
    out: dict[str, float] = {}
    for value in values:
        version, sep, pct = value.partition("=")
        try:
            number = float(pct.strip().removesuffix("%"))
        except ValueError:
            number = -1.0
        if not sep or not version or not 0 <= number <= 100:
            raise typer.BadParameter(f"{value!r}: give VERSION=PERCENT, e.g. 2=10%", param_hint="--version")
        out[version] = number
    return out


def _publish_policy(broker: str, keystore: Path | None, key_name: str | None, credential: Path, model: str,
                    weights: dict[str, float], seq: int | None, as_json: bool) -> None:
    import time

    from sdk.cli.inference_cmds import _run_or_exit
    from sdk.mesh import RoutingPolicy, publish_policy
    from sdk.messaging import SecureClient

    broker = _broker(broker)
    try:
        policy = RoutingPolicy(model, seq or int(time.time() * 1000), weights)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--version") from None

    async def main() -> None:
        key = _load_key(keystore, key_name)
        client = SecureClient(broker, key, credentials=[_read_credential(credential)])
        await client.connect()
        try:
            await publish_policy(client, policy)
        finally:
            await client.aclose()

    _run_or_exit(main(), as_json=as_json)
    doc = {"ok": True, "policy": policy.to_body()}
    typer.echo(json.dumps(doc) if as_json else f"routing policy {policy.seq} for {model}: "
               + (", ".join(f"{v}={p:g}%" for v, p in sorted(weights.items())) or "load only"))


@policy_app.command("set")
def policy_set(
    model: Annotated[str, typer.Argument(help="Model name as the nodes advertise it.")],
    version: Annotated[list[str], typer.Option("--version", help="VERSION=PERCENT of the model's requests "
                                                                 "(repeatable; the rest go to unlisted versions).")],
    broker: Annotated[str, typer.Option("--broker", help="MQTT broker URL of the mesh.")],
    credential: PolicyCredentialOpt,
    keystore: KeystoreOpt = None,
    key_name: KeyNameOpt = None,
    seq: SeqOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output (errors too).")] = False,
) -> None:
    """Send VERSION's share of MODEL's traffic to its nodes, e.g. --version 2=10%."""
    _publish_policy(broker, keystore, key_name, credential, model, parse_weights(version), seq, as_json)


@policy_app.command("clear")
def policy_clear(
    model: Annotated[str, typer.Argument(help="Model name as the nodes advertise it.")],
    broker: Annotated[str, typer.Option("--broker", help="MQTT broker URL of the mesh.")],
    credential: PolicyCredentialOpt,
    keystore: KeystoreOpt = None,
    key_name: KeyNameOpt = None,
    seq: SeqOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON output (errors too).")] = False,
) -> None:
    """Route MODEL on load alone again (a newer, empty policy)."""
    _publish_policy(broker, keystore, key_name, credential, model, {}, seq, as_json)


def register(app: typer.Typer) -> None:
    """Attach this module's commands and groups to the root app (``serve`` gains the mesh options)."""
    app.registered_commands = [c for c in app.registered_commands if c.name != "serve"]
    app.command("serve")(_extended_serve())
    app.command("gateway")(gateway)
    app.command("nodes")(nodes)
    app.add_typer(policy_app, name="nodes-policy")


__all__ = ["register", "gateway", "nodes", "nodes_table", "node_attachment", "collect_nodes", "NODE_COLUMNS",
           "parse_weights", "prefix_key_from_env", "policy_app"]
