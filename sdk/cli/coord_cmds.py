"""`autoglm` commands for the coord layer: ``coordinator`` (and ``coordinator init``), ``devices``,
``demo`` and the ``fleet`` group (:mod:`sdk.cli.fleet_cmds`).

SDK modules are imported inside the commands so ``autoglm --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import typer

log = logging.getLogger(__name__)


coordinator_app = typer.Typer(name="coordinator", help="Run the coordinator daemon, or set one up (init).")

LOCK_HINT = "stop the other coordinator (kill {pid}) or give this one its own data_dir"


def _embedded_address(url: str) -> tuple[str, int] | None:
    """``embedded`` → any free port; ``embedded://HOST:PORT`` → that address; else None."""
    from urllib.parse import urlsplit

    if url == "embedded":
        return ("127.0.0.1", 0)
    if not url.startswith("embedded://"):
        return None
    from sdk.cli.errors import CliError

    parts = urlsplit(url)
    try:
        port = parts.port or 1883
    except ValueError:
        port = -1
    if not parts.hostname or not 0 < port < 65536:
        raise CliError("invalid_broker_url", f"{url!r}: embedded://HOST:PORT needs a host and a port",
                       hint="e.g. embedded://127.0.0.1:1883", usage=True)
    return (parts.hostname, port)


def _reload_rules(coord: Any, config: Path) -> bool:
    """SIGHUP: re-read the config's rules (rules_file and inline); a bad file keeps the current set."""
    from sdk.coord.coordinator import load_config
    from sdk.errors import AutoGLMError

    try:
        rules = load_config(config).rules
    except AutoGLMError as exc:
        log.error("rules reload from %s failed; keeping the %d rule(s) in force: %s: %s", config,
                  len(coord.rules), exc.reason, exc,
                  extra={"event": "rules_reload_failed", "reason": exc.reason})
        return False
    coord.reload_rules(rules)
    log.info("rules reloaded from %s: %d rule(s)", config, len(rules),
             extra={"event": "rules_reloaded", "rules": len(rules)})
    return True


@coordinator_app.callback(invoke_without_command=True)
def coordinator(
    ctx: typer.Context,
    config: Path | None = typer.Option(None, "--config", "-c",
                                       help="Coordinator TOML file (autoglm coordinator init DIR writes one)"),
    broker: str | None = typer.Option(None, "--broker", help="Override coordinator.broker"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging (same as --log-level debug)"),
    log_level: str = typer.Option("info", "--log-level", help="debug | info | warning | error | critical"),
    log_format: str = typer.Option("text", "--log-format", help="text | json (one JSON object per line)"),
    log_file: Path | None = typer.Option(None, "--log-file", help="Append logs to this file instead of stderr"),
    fresh: bool = typer.Option(False, "--fresh", help="Start with an empty state store if the existing one "
                               "is corrupt, 0 bytes or missing (the bad file is moved aside)"),
) -> None:
    """Run the coordinator daemon until SIGTERM/SIGINT; SIGHUP reloads and validates the rules."""
    if ctx.invoked_subcommand is not None:
        return
    import asyncio
    import contextlib
    import os
    import signal

    from sdk.cli import options
    from sdk.cli.errors import CliError
    from sdk.cli.logging_setup import LOG_FORMATS, setup_logging

    if config is None:
        raise CliError("missing_option", "give --config FILE (the coordinator's TOML)",
                       hint="autoglm coordinator init DIR writes a starter config", usage=True)
    options.log_level(log_level)
    if log_format not in LOG_FORMATS:
        raise CliError("invalid_log_format", f"--log-format {log_format!r} is not a log format",
                       hint="use text or json", usage=True)
    from sdk.coord.coordinator import Coordinator, load_config
    from sdk.errors import AutoGLMError

    setup_logging(level="debug" if verbose else log_level, fmt=log_format, file=log_file)
    try:
        cfg = load_config(config)
    except AutoGLMError as exc:
        raise CliError(exc.reason, str(exc), usage=True) from exc
    url = broker or cfg.broker
    embedded_at = _embedded_address(url)
    if embedded_at is None:        # each URL of a failover list ("url1,url2") on its own
        url = ",".join(options.broker_url(u, option="--broker" if broker else "coordinator.broker")
                       for u in url.split(","))

    # -- high availability ([ha] enabled): an HA runner instead of one coordinator (ha.py)
    if cfg.ha.enabled:
        if embedded_at is not None:
            raise CliError("ha_needs_broker", "[ha] enabled needs an external broker, not an embedded one",
                           hint="set coordinator.broker to the brokers' mqtt(s):// URLs", usage=True)
        _run_ha(cfg, config, url, fresh=fresh)
        return
    # -- end high availability

    async def main() -> None:
        embedded = None
        coord_url = url
        if embedded_at is not None:
            from sdk.coord.coordinator.lock import DataDirLock

            with DataDirLock(cfg.data_dir):   # a second daemon hears "locked", not "port in use"
                pass
            from brokers.embedded import EmbeddedBroker

            embedded = EmbeddedBroker(host=embedded_at[0], port=embedded_at[1])  # own-topics ACL
            coord_url = embedded.url
        coord = Coordinator.from_config(cfg, broker=coord_url, fresh=fresh)
        advisor = None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: _reload_rules(coord, config) if coord.started else None)
        started = False
        try:
            if embedded is not None:
                embedded.add_admin(coord.did)  # only the coordinator writes device configs
                await embedded.start()
                log.info("embedded broker on %s", coord_url)
            await coord.start()
            started = True
            advisor = await _start_advisor(cfg, coord, coord_url)      # [model]: policy = "model" rules
            log.info("coordinator %s serving on %s (data %s, pid %d)", coord.did, coord_url, cfg.data_dir,
                     os.getpid(), extra={"event": "started", "did": coord.did, "broker": coord_url,
                                          "pid": os.getpid()})
            typer.echo(f"coordinator {coord.did} on {coord_url} (data: {cfg.data_dir})")
            await stop.wait()
        finally:
            if started:
                await coord.stop()
            if advisor is not None:
                with contextlib.suppress(Exception):
                    await advisor.aclose()
            if embedded is not None:
                await embedded.stop()
            log.info("coordinator stopped", extra={"event": "stopped"})

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except AutoGLMError as exc:
        if exc.reason == "locked":
            from sdk.coord.coordinator.lock import DataDirLock

            pid = DataDirLock(cfg.data_dir).holder()
            raise CliError("locked", str(exc), hint=LOCK_HINT.format(pid=pid if pid else "<pid>")) from exc
        raise


# -- model-made configs: the coordinator as a mesh peer ([model])
async def _start_advisor(cfg: Any, coord: Any, broker_url: str) -> Any:
    """With ``[model]``: connect a :class:`~sdk.mesh.advisor.MeshAdvisor` with the coordinator's key
    and access credential and hand it to the coordinator; unreachable, the rules use their fallback."""
    advisor = await _connect_advisor(cfg, coord.key, broker_url)
    _attach_advisor(coord, cfg, advisor)
    return advisor


async def _connect_advisor(cfg: Any, key: Any, broker_url: str) -> Any:
    """The started advisor of ``[model]`` (None without it, or when it cannot start: logged)."""
    settings = getattr(cfg, "model", None)
    if settings is None:
        return None
    from sdk.errors import AutoGLMError
    from sdk.identity import load_credential
    from sdk.mesh import NodePolicy
    from sdk.mesh.advisor import MeshAdvisor
    from sdk.messaging.broker_auth import did_credentials

    try:
        credential = load_credential(settings.credential)
        options: dict[str, Any] = dict(did_credentials(key))       # the broker knows it by its DID
        advisor = MeshAdvisor.connect(settings.broker or broker_url, key, credential=credential,
                                      node_policy=NodePolicy.trusting(*settings.node_issuers), model=settings.name,
                                      **options)
        await advisor.start()
    except (AutoGLMError, OSError) as exc:
        log.error("model advisor not started (%s); policy = \"model\" rules commit their fallback config", exc,
                  extra={"event": "model_advisor_failed", "reason": getattr(exc, "reason", "model_unavailable")})
        return None
    log.info("model advisor on %s (model %s)", settings.broker or broker_url, settings.name or "any",
             extra={"event": "model_advisor_started"})
    return advisor


def _attach_advisor(coord: Any, cfg: Any, advisor: Any) -> None:
    """Give ``coord`` the advisor and the ``[model]`` queue bounds."""
    if advisor is None:
        return
    coord.model_policy.limit(max_pending=cfg.model.max_pending, max_calls=cfg.model.max_calls)
    coord.model_policy.advisor = advisor
# -- end model-made configs


# -- high availability: the HA runner and `autoglm coordinator status`
def _run_ha(cfg: Any, config: Path, url: str, *, fresh: bool) -> None:
    """Run an :class:`~sdk.coord.coordinator.ha.HACoordinator` until SIGTERM/SIGINT."""
    import asyncio
    import contextlib
    import os
    import signal

    from sdk.coord.coordinator import Coordinator
    from sdk.coord.coordinator.ha import HACoordinator

    rules = [cfg.rules]          # a SIGHUP reload holds for later promotions too
    advisor: list[Any] = [None]  # [model]: one mesh advisor for every promotion

    def build() -> Any:
        coord = Coordinator.from_config(cfg, broker=url, fresh=fresh)
        coord.rules = rules[0]
        _attach_advisor(coord, cfg, advisor[0])
        return coord

    class _Reloader:
        started = True

        def reload_rules(self, new: Any) -> None:
            rules[0] = new
            if ha.coordinator is not None:
                ha.coordinator.reload_rules(new)

    ha = HACoordinator(build, store_url=cfg.store_url, data_dir=cfg.data_dir, instance=cfg.ha.instance,
                       lease_ttl=cfg.ha.lease_ttl, metrics_port=cfg.metrics_port, durability=cfg.durability)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
            loop.add_signal_handler(signal.SIGHUP, lambda: _reload_rules(_Reloader(), config))
        if cfg.model is not None:
            from sdk.coord.coordinator.daemon import load_key

            advisor[0] = await _connect_advisor(cfg, load_key(cfg), url)
        await ha.start()
        log.info("coordinator instance %s (%s) on %s, store %s (pid %d)", ha.instance, ha.holder, url,
                 cfg.store_url, os.getpid(), extra={"event": "started", "holder": ha.holder, "pid": os.getpid()})
        typer.echo(f"coordinator instance {ha.instance} on {url} (data: {cfg.data_dir}; lease in {cfg.store_url})")
        try:
            await stop.wait()
        finally:
            await ha.stop()
            if advisor[0] is not None:
                with contextlib.suppress(Exception):
                    await advisor[0].aclose()
            log.info("coordinator instance stopped", extra={"event": "stopped"})

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


@coordinator_app.command("status")
def coordinator_status(
    config: Path = typer.Option(..., "--config", "-c", help="Coordinator TOML file"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON output"),
) -> None:
    """This instance's role (active / standby), and the lease: holder, fencing token, expiry."""
    import time

    from sdk.cli.errors import guard
    from sdk.coord.coordinator import load_config
    from sdk.coord.coordinator.ha import read_status

    with guard(as_json=as_json):
        cfg = load_config(config)
        info: dict[str, Any] = read_status(cfg.data_dir) or {"role": "single", "instance": None}
        if cfg.store_url is not None:
            from sdk.coord.coordinator.store import open_store

            store = open_store(cfg.store_url)
            try:
                lease = store.lease()
            finally:
                store.close()
            info["lease"] = None if lease is None else {
                "holder": lease.holder, "token": lease.token, "expires": lease.expires,
                "expires_in": None if lease.expires is None else round(lease.expires - time.time(), 3)}
    if as_json:
        typer.echo(json.dumps({"ok": True, **info}, indent=2, default=str))
        return
    lease_info = info.get("lease") or {}
    typer.echo(f"role     {info.get('role')}" + (f" (instance {info['instance']}, pid {info.get('pid')})"
                                                  if info.get("instance") else ""))
    if lease_info:
        typer.echo(f"lease    held by {lease_info.get('holder') or '-'}, token {lease_info.get('token')}, "
                   f"expires in {lease_info.get('expires_in')} s")
    if info.get("failovers") is not None:
        typer.echo(f"counters promotions {info.get('promotions')}, failovers {info.get('failovers')}")
# -- end high availability


@coordinator_app.command("init")
def coordinator_init(
    directory: Path = typer.Argument(..., help="Directory to create (or an empty one)"),
    broker: str = typer.Option("embedded://127.0.0.1:1883", "--broker",
                               help="coordinator.broker: embedded://HOST:PORT (in-process) or mqtt(s)://HOST:PORT"),
    passphrase_env: str = typer.Option("AUTOGLM_PASSPHRASE", "--passphrase-env",
                                       help="Variable holding the keystores' passphrase; if unset, one is "
                                            "generated and printed once"),
    profile: str = typer.Option("default", "--profile", help="Operator profile name to write"),
    force: bool = typer.Option(False, "--force", help="Replace files a previous init wrote"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON output"),
) -> None:
    """Write a commented starter config, keys, issuer, rules and an admin operator profile into DIR."""
    import os
    import re

    from sdk.cli import options
    from sdk.cli.coord_init import init_directory
    from sdk.cli.errors import CliError, guard

    with guard(as_json=as_json):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", passphrase_env):
            raise CliError("invalid_option", f"--passphrase-env {passphrase_env!r} is not a variable name",
                           usage=True)
        if broker.strip() == "embedded":
            raise CliError("invalid_broker_url", "--broker embedded has no fixed port for operators and devices",
                           hint="give embedded://127.0.0.1:1883 (or another HOST:PORT)", usage=True)
        if _embedded_address(broker) is None:
            options.broker_url(broker)
        result = init_directory(directory, broker=broker, passphrase=os.environ.get(passphrase_env),
                                passphrase_env=passphrase_env, profile=profile, force=force)
    info = result.as_dict()
    if as_json:
        typer.echo(json.dumps({"ok": True, **info}, indent=2))
        return
    typer.echo(f"wrote {result.config} (coordinator {result.coordinator})")
    typer.echo(f"  issuer   {result.issuer}")
    typer.echo(f"  operator {result.operator} (admin), profile {result.profile!r} in {result.profiles_file}")
    if result.generated_passphrase:
        typer.echo(f"${passphrase_env} was not set; the keystores' passphrase (shown once, keep it):")
        typer.echo(f"  export {passphrase_env}={result.generated_passphrase}")
    typer.echo("next:")
    typer.echo(f"  autoglm coordinator -c {result.config}")
    typer.echo(f"  autoglm fleet ls{'' if result.profile == 'default' else ' --profile ' + result.profile}")


def _load_status(config: Path | None, data_dir: Path | None) -> dict[str, Any]:
    from sdk.coord.coordinator import Store, load_config

    if data_dir is None:
        if config is None:
            raise typer.BadParameter("give --config or --data-dir")
        data_dir = load_config(config).data_dir
    snap = data_dir / "status.json"
    if snap.exists():
        return json.loads(snap.read_text(encoding="utf-8"))
    db = data_dir / "coordinator.db"
    if not db.exists():
        raise FileNotFoundError(f"no coordinator state in {data_dir}")
    store = Store(db)
    try:
        devices = []
        for row in store.load_devices():
            rep = store.reported(row["did"])
            row.update(desired_version=store.latest_version(row["did"]), reported_version=rep.version,
                       report_status=rep.status, delta=store.delta(row["did"]))
            devices.append(row)
        counts = store.report_counts()
        total = sum(counts.values())
        return {"devices": devices, "metrics": {"reports": counts,
                                                "error_rate": counts.get("failed", 0) / total if total else 0}}
    finally:
        store.close()


def devices(
    config: Path | None = typer.Option(None, "--config", "-c", help="Coordinator TOML file"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="Coordinator data directory"),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable JSON output"),
) -> None:
    """List known devices (state, versions, delta) and the adaptation metrics."""
    from rich.console import Console
    from rich.table import Table

    from sdk.errors import AutoGLMError

    try:
        status = _load_status(config, data_dir)
    except (AutoGLMError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", "no_state")
        message = " ".join(str(exc).split())
        if as_json:
            typer.echo(json.dumps({"ok": False, "reason": reason,
                                   "error": {"reason": reason, "message": message, "hint": None}}))
        else:
            typer.echo(f"error: {reason}: {message}", err=True)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(status, indent=2, default=str))
        return
    table = Table(title=f"devices ({len(status.get('devices', []))})")
    for col in ("did", "kind", "state", "groups", "desired", "reported", "delta"):
        table.add_column(col, overflow="fold")
    for d in status.get("devices", []):
        table.add_row(d["did"], d.get("kind", ""), d.get("state", ""), ",".join(d.get("groups", [])),
                      str(d.get("desired_version", "")), str(d.get("reported_version", "")),
                      json.dumps(d.get("delta", {})) if d.get("delta") else "")
    console = Console(emoji=False)
    console.print(table)
    m = status.get("metrics", {})
    conv = m.get("convergence_ms", {})
    cost = m.get("config_cost", {})
    console.print(f"convergence p50 {conv.get('p50')} ms, p99 {conv.get('p99')} ms "
                  f"(n={conv.get('count', 0)}); error rate {m.get('error_rate', 0)}; "
                  f"config cost: {cost.get('bytes_mean')} B, apply {cost.get('apply_ms_mean')} ms, "
                  f"decision {cost.get('decision_ms_mean')} ms")


def demo(
    keep_running: bool = typer.Option(False, "--keep-running", help="Leave the mesh up after the scenario"),
    plain: bool = typer.Option(False, "--plain", help="No live redraw (final table only)"),
    rules: Path | None = typer.Option(None, "--rules", help=r"Use these \[\[rules]] instead of the demo's"),
    step_timeout: float = typer.Option(15.0, "--step-timeout", help="Seconds each step may take"),
    model: str = typer.Option("auto", "--model", help="The model step's engine: auto (the bundled SmolLM2 "
                              "if installed, else a stand-in engine), fake (the stand-in) or smollm2"),
) -> None:
    """Broker + coordinator + simulated devices in one process: auth, events, configs, revocation."""
    import asyncio

    from rich.console import Console

    from sdk.cli.demo import run_demo

    logging.basicConfig(level=logging.ERROR)
    console = Console(emoji=False)
    try:
        if model not in ("auto", "fake", "smollm2"):
            from sdk.cli.errors import CliError

            raise CliError("invalid_option", f"--model {model!r} is not auto, fake or smollm2", usage=True)
        kwargs: dict[str, Any] = {"step_timeout": step_timeout, "model": model}
        if rules is not None:
            kwargs["rules_toml"] = rules.read_text(encoding="utf-8")
        result = asyncio.run(run_demo(console=console, keep_running=keep_running, live=not plain, **kwargs))
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    if plain:
        from sdk.cli.demo import _View

        view = _View(result.steps, console)
        view.lines = result.log
        console.print(view.render())
    if not result.ok:
        console.print(f"[red]demo failed at step: {result.failed_step}[/red]")
        typer.echo(f"error: failed step: {result.failed_step}: {result.error}", err=True)
        raise typer.Exit(1)
    console.print(f"[green]all steps succeeded[/green]; convergence {result.convergence_ms:.2f} ms; "
                  f"auth handshakes {', '.join(f'{x:.1f}' for x in result.auth_ms)} ms")
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    """Attach this module's commands and groups to the root app."""
    from sdk.cli import fleet_cmds

    app.add_typer(coordinator_app, name="coordinator")
    app.command("devices")(devices)
    app.command("demo")(demo)
    fleet_cmds.register(app)
    from sdk.cli import rollout_cmds  # autoglm rollout
    rollout_cmds.register(app)
