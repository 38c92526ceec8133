"""``autoglm rollout``: staged roll-outs of a desired-state change, with health gates.

A roll-out sends a change to a canary, then to growing stages of the target set; each stage bakes
and must pass its gates (applied ratio, failure ratio, device health properties, a smoke command on
the canaries) before the next one starts, and a failed gate aborts and rolls every device that took
the change back (docs/OPERATIONS.md, "Rolling out a change safely"). Connection settings, ``--json``
and the error format are those of ``autoglm fleet`` (:mod:`sdk.cli.fleet_cmds`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from sdk.cli.fleet_cmds import (
    Body,
    BrokerOpt,
    CaOpt,
    CertOpt,
    CoordinatorOpt,
    CredentialOpt,
    JsonOpt,
    KeyFileOpt,
    KeystoreOpt,
    ProfileOpt,
    RequestTimeoutOpt,
    _ago,
    _console,
    _early,
    _esc,
    _json_object,
    _opts,
    _run,
    _usage,
    failure,
    parse_assignments,
    parse_target,
    parse_value,
    resolve_did,
)

rollout_app = typer.Typer(name="rollout", no_args_is_help=True,
                          help="Roll a desired-state change out in stages: canary, growth, gates, rollback.")

STATES = ("running", "paused", "completed", "aborted", "rolled_back", "cancelled")
FINAL_STATES = frozenset({"completed", "aborted", "rolled_back", "cancelled"})
HEALTH_OPS = {"<=": "le", ">=": "ge", "==": "eq", "<": "lt", ">": "gt", "=": "eq"}
OP_SYMBOLS = {"le": "<=", "ge": ">=", "eq": "=", "lt": "<", "gt": ">"}
MAX_DURATION = 7 * 86400.0
MAX_SMOKE_TIMEOUT = 60.0

#: rollout-specific reason → what to do about it (the rest: autoglm fleet's hints)
HINTS = {
    "not_found": "no such roll-out: list them with autoglm rollout ls",
    "invalid_state": "autoglm rollout status ID shows its state; a finished roll-out cannot change",
    "empty_target": "the target selects no devices: check it with autoglm fleet ls",
    "conflict": "another running roll-out already changes these devices: autoglm rollout ls --state running",
}

_PROPERTY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)?")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


# -- argument parsing -------------------------------------------------------------------------


def parse_duration(text: str, what: str) -> float:
    """``30s``, ``5m``, ``1h30m``, ``250ms`` or plain seconds (``90``) → seconds."""
    s = text.strip().lower()
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION.match(s, pos)
        if not m or m.end() == pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not s or pos != len(s):
        raise _usage(f"{what} wants a duration like 30s, 5m or 1h30m, got {text!r}")
    if total > MAX_DURATION:
        raise _usage(f"{what} must be at most 7 days, got {text!r}")
    return total


def parse_canary(text: str) -> dict[str, Any]:
    """``10%`` → ``{"percent": 10}``; ``5`` → ``{"count": 5}``."""
    s = text.strip()
    hint = "e.g. --canary 10% (of the target set) or --canary 5 (devices)"
    if s.endswith("%"):
        try:
            p = float(s[:-1])
        except ValueError:
            raise _usage(f"--canary {text!r} is not a percentage", hint) from None
        if not 0 < p < 100:
            raise _usage(f"--canary percentage must be above 0 and below 100, got {text!r}", hint)
        return {"percent": int(p) if p.is_integer() else p}
    if not s.isdigit() or int(s) < 1:
        raise _usage(f"--canary wants a device count (>= 1) or a percentage, got {text!r}", hint)
    return {"count": int(s)}


def parse_steps(text: str) -> list[float]:
    """``25,50,100`` (``%`` optional) → cumulative percentages, increasing, ending at 100."""
    hint = "cumulative percentages of the target set, increasing, ending at 100: e.g. --steps 25,50,100"
    out: list[float] = []
    for part in text.split(","):
        item = part.strip().removesuffix("%")
        try:
            value = float(item)
        except ValueError:
            raise _usage(f"--steps: {part.strip()!r} is not a number", hint) from None
        if not 0 < value <= 100:
            raise _usage(f"--steps: {part.strip()!r} is not between 0 and 100", hint)
        if out and value <= out[-1]:
            raise _usage(f"--steps must increase, got {text!r}", hint)
        out.append(value)
    if not out or out[-1] != 100:
        raise _usage(f"--steps must end at 100, got {text!r}", hint)
    return [int(v) if v.is_integer() else v for v in out]


def parse_growth(steps: str | None, factor: float | None, cap: float | None) -> dict[str, Any]:
    """``--steps`` or ``--factor`` (with an optional ``--cap``); neither: straight to 100%."""
    if steps is not None and (factor is not None or cap is not None):
        raise _usage("give --steps or --factor/--cap, not both")
    if steps is not None:
        return {"steps": parse_steps(steps)}
    if factor is None:
        if cap is not None:
            raise _usage("--cap goes with --factor", "e.g. --factor 2 --cap 50")
        return {"steps": [100]}
    if not 1 < factor <= 100:
        raise _usage(f"--factor must be above 1 (each stage this many times the last), got {factor:g}")
    out: dict[str, Any] = {"factor": factor}
    if cap is not None:
        if not 0 < cap <= 100:
            raise _usage(f"--cap is the largest stage in percent of the target set (0..100], got {cap:g}")
        out["cap"] = cap
    return out


def parse_ratio(text: str, what: str) -> float:
    """``0.95`` or ``95%`` → 0.95 (between 0 and 1)."""
    s = text.strip()
    try:
        value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise _usage(f"{what} wants a fraction (0.95) or a percentage (95%), got {text!r}") from None
    if not 0 <= value <= 1:
        raise _usage(f"{what} must be between 0 and 1 (0% and 100%), got {text!r}")
    return value


def parse_health(text: str) -> dict[str, Any]:
    """``app.crashes<=0`` → ``{"property": "app.crashes", "op": "le", "value": 0}``."""
    hint = "PROPERTY then <=, <, =, >= or > then a value: e.g. --health 'app.crashes<=0'"
    for sym, op in HEALTH_OPS.items():
        prop, sep, raw = text.partition(sym)
        if sep:
            prop, raw = prop.strip(), raw.strip()
            if not _PROPERTY.match(prop):
                raise _usage(f"--health {text!r}: {prop!r} is not a property name", hint)
            if not raw or raw[0] in "<>=":
                raise _usage(f"--health {text!r}: no value after {sym}", hint)
            value = parse_value(raw)
            if op in ("le", "lt", "ge", "gt") and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise _usage(f"--health {text!r}: {sym} needs a number", hint)
            return {"property": prop, "op": op, "value": value}
    raise _usage(f"--health {text!r} has no comparison", hint)


def build_start(*, args: list[str], where: str | None, unset: list[str] | None, name: str | None,
                canary: str, steps: str | None, factor: float | None, cap: float | None, bake: str,
                min_applied: str | None, max_failed: str | None, stage_timeout: str | None,
                health: list[str] | None, smoke: str | None, smoke_args: str | None,
                smoke_timeout: float) -> dict[str, Any]:
    """The ``rollout.start`` params from the command line (the target's DID is resolved later)."""
    target_text, items = (None, args) if where is not None else (args[0] if args else None, args[1:])
    target = parse_target(target_text, where)
    change: dict[str, Any] = {}
    sets = parse_assignments(items)
    if sets:
        change["set"] = sets
    keys = [k.strip() for k in unset or []]
    bad = [k for k in keys if not k or "=" in k]
    if bad:
        raise _usage(f"--unset takes key names, got {bad[0]!r}")
    if keys:
        change["unset"] = keys
    if not change:
        raise _usage("no change: give KEY=VALUE and/or --unset KEY",
                     "e.g. autoglm rollout start group:phones ui.layout=v4 --canary 10%")
    overlap = set(sets) & set(keys)
    if overlap:
        raise _usage(f"{sorted(overlap)[0]!r} is both set and unset")
    gates: dict[str, Any] = {}
    if min_applied is not None:
        gates["min_applied"] = parse_ratio(min_applied, "--min-applied")
    if max_failed is not None:
        gates["max_failed"] = parse_ratio(max_failed, "--max-failed")
    if stage_timeout is not None:
        t = parse_duration(stage_timeout, "--stage-timeout")
        if t <= 0:
            raise _usage("--stage-timeout must be above 0")
        gates["timeout"] = t
    if health:
        gates["health"] = [parse_health(h) for h in health]
    if smoke_args is not None and smoke is None:
        raise _usage("--smoke-args goes with --smoke METHOD")
    if smoke is not None:
        if not smoke.strip():
            raise _usage("--smoke METHOD is empty")
        if not 0 < smoke_timeout <= MAX_SMOKE_TIMEOUT:
            raise _usage(f"--smoke-timeout must be between 0 and {MAX_SMOKE_TIMEOUT:g} seconds, "
                         f"got {smoke_timeout:g}")
        gates["smoke"] = {"method": smoke.strip(),
                          "args": _json_object(smoke_args, "--smoke-args") if smoke_args else {},
                          "timeout": smoke_timeout}
    params: dict[str, Any] = {
        "target": target, "change": change,
        "stages": {"canary": parse_canary(canary), "growth": parse_growth(steps, factor, cap)},
        "bake": parse_duration(bake, "--bake"), "gates": gates,
    }
    if name is not None:
        if not name.strip():
            raise _usage("--name is empty")
        params["name"] = name.strip()
    return params


def parse_id(text: str) -> str:
    s = text.strip()
    if not s or len(s) > 128 or any(c.isspace() for c in s):
        raise _usage(f"{text!r} is not a roll-out id", "autoglm rollout ls lists them")
    return s


# -- output -----------------------------------------------------------------------------------


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-" if value is None else str(value)
    return f"{value:.{digits}g}"


def _gate_text(name: str, gate: Any) -> str:
    if not isinstance(gate, dict):
        return f"{name} ?"
    ok = gate.get("ok")
    mark = "[green]✓[/green]" if ok is True else "[red]✗[/red]" if ok is False else "[yellow]…[/yellow]"
    value, limit = gate.get("value"), gate.get("limit")
    if isinstance(value, dict):              # smoke: {"passed": n, "failed": m} (its limit is the method)
        detail = " ".join(f"{_num(v)} {k}" for k, v in value.items())
    else:
        detail = _num(value) if limit is None else f"{_num(value)}/{_num(limit)}"
    return f"{mark} {_esc(name)} {_esc(detail)}"


def _state_style(state: str) -> str:
    return {"running": "cyan", "paused": "yellow", "completed": "green", "aborted": "red",
            "rolled_back": "red", "cancelled": "magenta"}.get(state, "white")


def status_lines(doc: dict[str, Any], *, chart_width: int = 48, chart_height: int = 6) -> list[Any]:
    """What ``rollout status`` prints: a header, one row per stage (progress, counts, gates),
    the metrics line and the e(t) chart — a list of Rich renderables."""
    from rich.columns import Columns
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    from sdk.cli.charts import braille_chart

    state = str(doc.get("state", "?"))
    stages = doc.get("stages") or []
    stage = doc.get("stage")
    where = f"stage {stage + 1}/{len(stages)}" if isinstance(stage, int) and stages else "stage -"
    name = f" {_esc(doc['name'])}" if doc.get("name") else ""
    out: list[Any] = [Text.from_markup(f"[bold]rollout {_esc(doc.get('id', '?'))}[/bold]{name}  "
                                       f"[{_state_style(state)}]{_esc(state)}[/]  {where}")]
    if doc.get("reason"):
        out.append(Text.from_markup(f"reason: {_esc(doc['reason'])}"))
    back = doc.get("rollback")
    if isinstance(back, dict):
        out.append(Text.from_markup(f"rollback: {_esc(back.get('restored', 0))} of {_esc(back.get('devices', 0))} "
                                    f"device(s) restored, {_esc(back.get('failed', 0))} failed"))
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("#", "devices", "of", "progress", "applied", "failed", "pending"):
        table.add_column(col, no_wrap=True, justify="left" if col == "progress" else "right")
    gate_lines = Table.grid(padding=(0, 1))           # wrapped lines stay under their stage's gates
    gate_lines.add_column(no_wrap=True)
    gate_lines.add_column()
    for i, s in enumerate(stages):
        if not isinstance(s, dict):
            continue
        index = s.get("index", i)
        size = int(s.get("size") or 0)              # cumulative: the target devices once this stage is in
        members = int(s.get("members") or 0) if s.get("members") is not None else size
        applied = int(s.get("applied") or 0)
        label = f"{index}" + (" canary" if index == 0 else "")
        mark = "▶ " if index == stage and state in ("running", "paused") else ""
        table.add_row(mark + label, str(members), str(size),
                      ProgressBar(total=max(members, 1), completed=min(applied, members), width=12),
                      str(applied), str(s.get("failed") or 0), str(s.get("pending") or 0))
        gates = s.get("gates") or {}
        if gates:
            items = [Text.from_markup(_gate_text(k, gates[k])) for k in gates]
            if s.get("promoted"):
                items.append(Text.from_markup("[green]promoted[/green]"))
            gate_lines.add_row(f"  gates {index}:", Columns(items, padding=(0, 2)))
    out.append(table)
    if gate_lines.row_count:
        out.append(gate_lines)
    m = doc.get("metrics") or {}
    lam = m.get("lambda")
    out.append(Text.from_markup(
        f"λ {_num(lam)}/s" + (f" (e halves in {_num(0.6931 / lam)} s)" if isinstance(lam, (int, float))
                              and not isinstance(lam, bool) and lam > 0 else "")
        + f"   convergence p50 {_num(m.get('convergence_p50'))} s  p95 {_num(m.get('convergence_p95'))} s"))
    out.append(Text.from_markup(f"cost ratio {_num(m.get('cost_ratio'))}   coordinator cpu "
                                f"{_num(m.get('cpu_seconds'))} s   sent {_bytes(m.get('bytes_sent'))}"))
    curve = doc.get("curve") or []
    for line in braille_chart(curve, width=chart_width, height=chart_height,
                              label="e(t): fraction of the target set not yet converged"):
        out.append(Text(line))
    return out


def _bytes(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "-"
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"


def render_status(doc: dict[str, Any]) -> None:
    console = _console()
    for item in status_lines(doc):
        console.print(item)


def rollouts_table(rollouts: list[dict[str, Any]], now: float | None = None) -> Any:
    """The ``rollout ls`` table."""
    from rich.table import Table

    table = Table(title=f"roll-outs ({len(rollouts)})", title_justify="left", box=None, pad_edge=False,
                  header_style="bold")
    for col in ("id", "name", "state", "stage", "applied/failed/members", "created"):
        table.add_column(col, no_wrap=True, overflow="ellipsis", max_width=24 if col == "name" else None)
    for r in rollouts:
        stages = r.get("stages") or []
        stage = r.get("stage")
        where = f"{stage + 1}/{len(stages)}" if isinstance(stage, int) and stages else "-"
        c = {k: v for k, v in (r.get("counts") or {}).items() if isinstance(v, int) and not isinstance(v, bool)}
        took = sum(c.get(k, 0) for k in ("applied", "restoring", "restored", "restore_failed"))
        counts = f"{took}/{c.get('failed', 0)}/{sum(c.values())}"
        state = str(r.get("state", ""))
        table.add_row(_esc(r.get("id", "")), _esc(r.get("name") or ""),
                      f"[{_state_style(state)}]{_esc(state)}[/]", where, counts, _esc(_ago(r.get("created"), now)))
    return table


def write_plot(doc: dict[str, Any], path: Path) -> int:
    """The status document's convergence curve as a PNG at ``path``; returns the points drawn."""
    from sdk.cli.charts import clean, line_chart_png

    points = clean(doc.get("curve") or [])
    if not points:
        raise failure("no_curve", f"roll-out {doc.get('id')} has no convergence curve yet",
                      "plot again once its first stage has started")
    path.write_bytes(line_chart_png(points))
    return len(points)


# -- the calls --------------------------------------------------------------------------------


async def call(op: Any, name: str, params: dict[str, Any], timeout: float) -> Any:
    """``op.call`` with roll-out wording for the reasons that mean something else here."""
    from sdk.errors import AutoGLMError

    try:
        return await op.call(name, params, timeout=timeout)
    except AutoGLMError as exc:
        hint = HINTS.get(exc.reason)
        if hint is None:
            raise
        raise failure(exc.reason, str(exc), hint) from exc


def _conn(profile: str | None, broker: str | None, keystore: Path | None, credential: Path | None,
          coordinator: str | None, ca: Path | None, cert: Path | None, key_file: Path | None,
          request_timeout: float) -> Any:
    return _opts(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)


def _by_id(op_name: str, ident: str, timeout: float) -> Body:
    async def body(op: Any) -> Any:
        return await call(op, op_name, {"id": ident}, timeout)
    return body


# -- commands ---------------------------------------------------------------------------------


def render_started(result: dict[str, Any], *, hint: bool = True) -> None:
    sizes = result.get("stages") or []
    typer.echo(f"rollout {result.get('id')} {result.get('state', 'running')}: "
               f"{len(sizes)} stage(s) of {', '.join(str(s) for s in sizes)} device(s)")
    if hint:
        typer.echo(f"follow it: autoglm rollout status {result.get('id')} --watch", err=True)


@rollout_app.command("start")
def rollout_start(
    args: list[str] = typer.Argument(..., help="TARGET (DID, group:NAME, tag:NAME; omit with --where) "
                                     "then KEY=VALUE... (VALUE is JSON if it parses, else text)"),
    where: str | None = typer.Option(None, "--where", help="Target the devices a fleet.query where selects"),
    unset: list[str] | None = typer.Option(None, "--unset", help="Key to remove (repeatable)"),
    name: str | None = typer.Option(None, "--name", help="A name for the roll-out"),
    canary: str = typer.Option("10%", "--canary", help="Canary size: N devices or P% of the target set"),
    steps: str | None = typer.Option(None, "--steps", help="Growth stages, cumulative %: 25,50,100"),
    factor: float | None = typer.Option(None, "--factor", help="Exponential growth: each stage FACTOR x the last"),
    cap: float | None = typer.Option(None, "--cap", help="With --factor: largest stage, in % of the target set"),
    bake: str = typer.Option("0s", "--bake", help="Time each stage bakes once its gates pass (30s, 5m)"),
    min_applied: str | None = typer.Option(None, "--min-applied", help="Gate: applied ratio (0.95 or 95%)"),
    max_failed: str | None = typer.Option(None, "--max-failed", help="Gate: failure ratio at most (0.05 or 5%)"),
    stage_timeout: str | None = typer.Option(None, "--stage-timeout", help="Gate: a stage passes within (10m)"),
    health: list[str] | None = typer.Option(None, "--health", help="Gate: reported PROP<=VALUE (repeatable)"),
    smoke: str | None = typer.Option(None, "--smoke", help="Gate: METHOD each canary runs after applying"),
    smoke_args: str | None = typer.Option(None, "--smoke-args", help="Smoke arguments as a JSON object"),
    smoke_timeout: float = typer.Option(10.0, "--smoke-timeout", help="Seconds a smoke call may take"),
    watch: bool = typer.Option(False, "--watch", "-w", help="Then follow it as rollout status --watch does"),
    profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
    credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
    ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
    request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
) -> None:
    """Start a staged roll-out of a desired-state change."""
    params = _early(as_json, lambda: build_start(
        args=args, where=where, unset=unset, name=name, canary=canary, steps=steps, factor=factor, cap=cap,
        bake=bake, min_applied=min_applied, max_failed=max_failed, stage_timeout=stage_timeout, health=health,
        smoke=smoke, smoke_args=smoke_args, smoke_timeout=smoke_timeout))
    opts = _conn(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)

    async def body(op: Any) -> Any:
        target = dict(params["target"])
        if "did" in target:
            target["did"] = await resolve_did(op, target["did"], request_timeout)
        started = await call(op, "rollout.start", {**params, "target": target}, request_timeout)
        if not watch:
            return started
        if not as_json:
            render_started(started, hint=False)
        doc = await call(op, "rollout.status", {"id": started["id"]}, request_timeout)
        return await _follow(op, started["id"], doc, 1.0, request_timeout, live=live)

    live = watch and not as_json and _console().is_terminal

    def render(result: dict[str, Any]) -> None:
        if not watch:
            render_started(result)
        elif not live:
            render_status(result)

    _run(opts, as_json, "rollout.start", body, render)


@rollout_app.command("ls")
def rollout_ls(
    state: str | None = typer.Option(None, "--state", help=f"Only this state: {' | '.join(STATES)}"),
    profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
    credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
    ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
    request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
) -> None:
    """List roll-outs, oldest first."""
    def params() -> dict[str, Any]:
        if state is not None and state not in STATES:
            raise _usage(f"--state must be one of {', '.join(STATES)}, got {state!r}")
        return {"state": state} if state else {}

    p = _early(as_json, params)
    opts = _conn(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)

    async def body(op: Any) -> Any:
        return await call(op, "rollout.ls", p, request_timeout)

    def render(result: dict[str, Any]) -> None:
        _console().print(rollouts_table(result.get("rollouts") or []))

    _run(opts, as_json, "rollout.ls", body, render)


@rollout_app.command("status")
def rollout_status(
    ident: str = typer.Argument(..., metavar="ID", help="Roll-out id (from rollout start or rollout ls)"),
    watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until the roll-out ends"),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between refreshes with --watch"),
    plot: Path | None = typer.Option(None, "--plot", help="Also write the e(t) curve as a PNG to this file"),
    profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
    credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
    ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
    request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
) -> None:
    """Stage, counts, gates, λ, cost ratio and the e(t) chart; --watch follows it live."""
    def check() -> str:
        if not 0.1 <= interval <= 600:
            raise _usage(f"--interval must be between 0.1 and 600 seconds, got {interval:g}")
        if plot is not None and (plot.is_dir() or not plot.parent.is_dir()):
            raise _usage(f"--plot {plot}: not a file in an existing directory")
        return parse_id(ident)

    rid = _early(as_json, check)
    opts = _conn(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)
    live = watch and not as_json and _console().is_terminal     # elsewhere: the final document only

    async def body(op: Any) -> Any:
        doc = await call(op, "rollout.status", {"id": rid}, request_timeout)
        if not watch:
            return doc
        return await _follow(op, rid, doc, interval, request_timeout, live=live)

    def render(result: dict[str, Any]) -> None:
        if not live:
            render_status(result)

    result = _run(opts, as_json, "rollout.status", body, render)
    if plot is not None:
        from sdk.cli.errors import guard

        with guard(as_json=as_json):
            n = write_plot(result, plot)
        if not as_json:
            typer.echo(f"wrote {plot} ({n} points)", err=True)


async def _follow(op: Any, rid: str, doc: dict[str, Any], interval: float, timeout: float, *,
                  live: bool) -> dict[str, Any]:
    """Poll ``rollout.status`` until a final state, redrawing with Rich Live when ``live``."""
    import asyncio

    from rich.console import Group
    from rich.live import Live

    if not live:
        while doc.get("state") not in FINAL_STATES:
            await asyncio.sleep(interval)
            doc = await call(op, "rollout.status", {"id": rid}, timeout)
        return doc
    console = _console()
    with Live(Group(*status_lines(doc)), console=console, refresh_per_second=4, transient=False) as view:
        while doc.get("state") not in FINAL_STATES:
            await asyncio.sleep(interval)
            doc = await call(op, "rollout.status", {"id": rid}, timeout)
            view.update(Group(*status_lines(doc)))
    return doc


def _action(op_name: str, doc: str) -> Callable[..., None]:
    def command(
        ident: str = typer.Argument(..., metavar="ID", help="Roll-out id (from rollout ls)"),
        profile: str | None = ProfileOpt, broker: str | None = BrokerOpt, keystore: Path | None = KeystoreOpt,
        credential: Path | None = CredentialOpt, coordinator: str | None = CoordinatorOpt,
        ca: Path | None = CaOpt, cert: Path | None = CertOpt, key_file: Path | None = KeyFileOpt,
        request_timeout: float = RequestTimeoutOpt, as_json: bool = JsonOpt,
    ) -> None:
        rid = _early(as_json, lambda: parse_id(ident))
        opts = _conn(profile, broker, keystore, credential, coordinator, ca, cert, key_file, request_timeout)
        _run(opts, as_json, op_name, _by_id(op_name, rid, request_timeout), render_status)

    command.__doc__ = doc
    return command


rollout_app.command("pause")(_action("rollout.pause", "Pause a roll-out: no promotion until it resumes."))
rollout_app.command("resume")(_action("rollout.resume", "Resume a paused roll-out where it stopped."))
rollout_app.command("cancel")(_action("rollout.cancel", "Stop a roll-out; devices keep what they applied."))
rollout_app.command("abort")(_action("rollout.abort", "Stop a roll-out and roll back every device that "
                                     "took the change (a new signed version restoring the old values)."))


def register(app: typer.Typer) -> None:
    """Attach ``autoglm rollout`` to the root app."""
    app.add_typer(rollout_app, name="rollout")


__all__ = ["rollout_app", "register", "build_start", "parse_canary", "parse_duration", "parse_health",
           "parse_ratio", "parse_steps", "rollouts_table", "status_lines", "write_plot", "FINAL_STATES",
           "HINTS"]
