"""`autoglm` commands for the coord layer: ``coordinator``, ``devices`` and ``demo``.

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


def coordinator(
    config: Path = typer.Option(..., "--config", "-c", help="Coordinator TOML file (`autoglm examples DIR` writes a commented one)"),
    broker: str | None = typer.Option(None, "--broker", help="Override coordinator.broker"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging"),
    fresh: bool = typer.Option(False, "--fresh", help="Start with an empty state store if the existing one "
                               "is corrupt, 0 bytes or missing (the bad file is moved aside)"),
) -> None:
    """Run the coordinator daemon until interrupted."""
    import asyncio
    import contextlib
    import signal

    from sdk.coord.coordinator import Coordinator, load_config
    from sdk.errors import AutoGLMError

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(config)
    except AutoGLMError as exc:
        typer.echo(f"error: {exc.reason}: {exc}", err=True)
        raise typer.Exit(2) from exc

    async def main() -> None:
        embedded = None
        url = broker or cfg.broker
        if url == "embedded":
            from brokers.embedded import EmbeddedBroker

            embedded = EmbeddedBroker()  # own-topics ACL; the port is chosen now
            url = embedded.url
        coord = Coordinator.from_config(cfg, broker=url, fresh=fresh)
        if embedded is not None:
            embedded.add_admin(coord.did)  # only the coordinator writes device configs
            await embedded.start()
            log.info("embedded broker on %s", url)
        await coord.start()
        typer.echo(f"coordinator {coord.did} on {url} (data: {cfg.data_dir})")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await coord.stop()
            if embedded is not None:
                await embedded.stop()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except AutoGLMError as exc:
        typer.echo(f"error: {exc.reason}: {exc}", err=True)
        raise typer.Exit(1) from exc


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
        typer.echo(f"error: {getattr(exc, 'reason', 'no_state')}: {exc}", err=True)
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
) -> None:
    """Broker + coordinator + simulated devices in one process: auth, events, configs, revocation."""
    import asyncio

    from rich.console import Console

    from sdk.cli.demo import run_demo

    logging.basicConfig(level=logging.ERROR)
    console = Console(emoji=False)
    try:
        kwargs: dict[str, Any] = {"step_timeout": step_timeout}
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
    app.command("coordinator")(coordinator)
    app.command("devices")(devices)
    app.command("demo")(demo)
