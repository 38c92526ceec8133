"""`autoglm rollout`: argument parsing, the terminal chart, the PNG writer, status rendering, and the
path start → status → abort against a real coordinator on both brokers."""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sdk.cli import app
from sdk.cli.charts import LINE, braille_chart, frame_for, line_chart_png
from sdk.cli.errors import CliError
from sdk.cli.rollout_cmds import (
    build_start,
    parse_canary,
    parse_duration,
    parse_health,
    parse_ratio,
    parse_steps,
    rollouts_table,
    status_lines,
    write_plot,
)

runner = CliRunner()
DID = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


# -- argument parsing -------------------------------------------------------------------------


def test_canary_steps_durations_ratios_health() -> None:
    assert parse_canary("10%") == {"percent": 10} and parse_canary("2.5%") == {"percent": 2.5}
    assert parse_canary("5") == {"count": 5}
    assert parse_steps("25,50,100") == [25, 50, 100] and parse_steps("10%, 33.3%,100%") == [10, 33.3, 100]
    assert parse_duration("30s", "--bake") == 30 and parse_duration("1h30m", "--bake") == 5400
    assert parse_duration("250ms", "--bake") == 0.25 and parse_duration("90", "--bake") == 90
    assert parse_ratio("0.95", "--min-applied") == 0.95 and parse_ratio("5%", "--max-failed") == 0.05
    assert parse_health("app.crashes<=0") == {"property": "app.crashes", "op": "le", "value": 0}
    assert parse_health("battery >= 0.2") == {"property": "battery", "op": "ge", "value": 0.2}
    assert parse_health("app.state=ok") == {"property": "app.state", "op": "eq", "value": "ok"}
    assert parse_health("errors<3") == {"property": "errors", "op": "lt", "value": 3}


def test_start_params_follow_the_contract() -> None:
    params = build_start(args=["group:phones", "ui.layout=v4", "level=3"], where=None, unset=["ui.old"],
                         name="ui v4", canary="10%", steps="25,50,100", factor=None, cap=None, bake="30s",
                         min_applied="95%", max_failed="0.05", stage_timeout="10m",
                         health=["app.crashes<=0"], smoke="smoke", smoke_args='{"deep": true}', smoke_timeout=5)
    assert params == {
        "target": {"group": "phones"}, "name": "ui v4",
        "change": {"set": {"ui.layout": "v4", "level": 3}, "unset": ["ui.old"]},
        "stages": {"canary": {"percent": 10}, "growth": {"steps": [25, 50, 100]}},
        "bake": 30.0,
        "gates": {"min_applied": 0.95, "max_failed": 0.05, "timeout": 600.0,
                  "health": [{"property": "app.crashes", "op": "le", "value": 0}],
                  "smoke": {"method": "smoke", "args": {"deep": True}, "timeout": 5}},
    }
    exp = build_start(args=["a=1"], where='{"kind": "phone"}', unset=None, name=None, canary="3", steps=None,
                      factor=2.0, cap=50, bake="0", min_applied=None, max_failed=None, stage_timeout=None,
                      health=None, smoke=None, smoke_args=None, smoke_timeout=10)
    assert exp["target"] == {"where": {"kind": "phone"}} and exp["gates"] == {}
    assert exp["stages"] == {"canary": {"count": 3}, "growth": {"factor": 2.0, "cap": 50}}


@pytest.mark.parametrize("args, needle", [
    (["start", "group:g", "a=1", "--canary", "0"], "--canary wants a device count"),
    (["start", "group:g", "a=1", "--canary", "150%"], "--canary percentage must be above 0 and below 100"),
    (["start", "group:g", "a=1", "--canary", "ten"], "--canary wants a device count"),
    (["start", "group:g", "a=1", "--canary", "x%"], "is not a percentage"),
    (["start", "group:g", "a=1", "--steps", "50,25,100"], "--steps must increase"),
    (["start", "group:g", "a=1", "--steps", "25,50"], "--steps must end at 100"),
    (["start", "group:g", "a=1", "--steps", "25,abc,100"], "'abc' is not a number"),
    (["start", "group:g", "a=1", "--steps", "0,100"], "is not between 0 and 100"),
    (["start", "group:g", "a=1", "--steps", "50,100", "--factor", "2"], "not both"),
    (["start", "group:g", "a=1", "--factor", "1"], "--factor must be above 1"),
    (["start", "group:g", "a=1", "--factor", "2", "--cap", "120"], "--cap is the largest stage"),
    (["start", "group:g", "a=1", "--cap", "50"], "--cap goes with --factor"),
    (["start", "group:g", "a=1", "--bake", "soon"], "--bake wants a duration"),
    (["start", "group:g", "a=1", "--stage-timeout", "0s"], "--stage-timeout must be above 0"),
    (["start", "group:g", "a=1", "--min-applied", "1.5"], "--min-applied must be between 0 and 1"),
    (["start", "group:g", "a=1", "--max-failed", "lots"], "--max-failed wants a fraction"),
    (["start", "group:g", "a=1", "--health", "app.crashes"], "has no comparison"),
    (["start", "group:g", "a=1", "--health", "app.crashes<=few"], "<= needs a number"),
    (["start", "group:g", "a=1", "--health", "<=3"], "is not a property name"),
    (["start", "group:g", "a=1", "--health", "x<="], "no value after <="),
    (["start", "group:g", "a=1", "--smoke-args", "{}"], "--smoke-args goes with --smoke"),
    (["start", "group:g", "a=1", "--smoke", "smoke", "--smoke-args", "[1]"], "--smoke-args must be a JSON object"),
    (["start", "group:g", "a=1", "--smoke", "smoke", "--smoke-timeout", "90"], "--smoke-timeout must be"),
    (["start", "group:g"], "no change"),
    (["start", "group:g", "a=1", "--unset", "a"], "is both set and unset"),
    (["start", "group:g", "ui.layout"], "expected KEY=VALUE"),
    (["start", "tag:", "a=1"], "tag: needs a name"),
    (["ls", "--state", "sleeping"], "--state must be one of"),
    (["status", "r1", "--interval", "0"], "--interval must be between"),
    (["status", "r1", "--plot", "/nonexistent-dir/x.png"], "not a file in an existing directory"),
    (["abort", " "], "is not a roll-out id"),
])
def test_bad_arguments_are_one_line_usage_errors(args: list[str], needle: str, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOGLM_CONFIG_DIR", str(tmp_path))          # no profile: nothing to connect to
    result = invoke("rollout", *args)
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("error: invalid_option:") and needle in lines[0], result.output
    assert len(lines) <= 2 and all(x.startswith("hint: ") for x in lines[1:]), result.output
    as_json = invoke("rollout", *args, "--json")
    assert as_json.exit_code == 2
    doc = json.loads(as_json.stdout)
    assert doc["ok"] is False and doc["reason"] == "invalid_option" and needle in doc["error"]["message"]


def test_no_connection_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AUTOGLM_CONFIG_DIR", str(tmp_path))
    for var in ("AUTOGLM_BROKER", "AUTOGLM_OPERATOR_KEYSTORE", "AUTOGLM_OPERATOR_CREDENTIAL",
                "AUTOGLM_COORDINATOR", "AUTOGLM_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    result = invoke("rollout", "status", "r1", "--json")
    assert result.exit_code == 2 and json.loads(result.stdout)["reason"] == "no_connection"


# -- the terminal chart -------------------------------------------------------------------------


def _dots(line: str) -> str:
    return "".join(ch for ch in line if 0x2800 <= ord(ch) <= 0x28FF)


def test_braille_chart_draws_a_falling_curve_with_axes() -> None:
    points = [(t, math.exp(-0.2 * t)) for t in range(0, 41)]
    lines = braille_chart(points, width=20, height=5, label="e(t)")
    assert lines[0] == "e(t)" and len(lines) == 1 + 5 + 2
    rows = [_dots(x) for x in lines[1:6]]
    assert all(len(r) == 20 for r in rows)
    assert lines[1].startswith("1.0 ┤") and lines[5].startswith("0.0 ┤") and "└" + "─" * 20 in lines[6]
    assert lines[7].split() == ["0.0s", "40s"]
    top, bottom = rows[0], rows[-1]
    assert ord(top[0]) & 0x01, "the curve starts at e = 1 (top-left dot)"
    assert ord(bottom[-1]) & 0x80 or ord(bottom[-1]) & 0x40, "and ends near 0 (bottom row, last cell)"
    assert top[-1] == chr(0x2800), "nothing at the top right"
    for r in rows:                                # monotone: each row's lit cells are one run, left to right
        lit = [i for i, ch in enumerate(r) if ch != chr(0x2800)]
        assert lit == list(range(lit[0], lit[-1] + 1)) if lit else True
    assert braille_chart([]) == ["e(t): (no data)"]
    assert braille_chart([(0, float("nan")), ("x", 1)]) == ["e(t): (no data)"]  # type: ignore[list-item]


# -- the PNG writer ----------------------------------------------------------------------------


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB rows of a PNG this writer produced (truecolour, 8-bit, filter 0)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, colour, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == height * stride
    rows = [raw[r * stride:(r + 1) * stride] for r in range(height)]
    assert all(row[0] == 0 for row in rows)
    return width, height, [row[1:] for row in rows]


def pixel(rows: list[bytes], x: int, y: int) -> tuple[int, int, int]:
    r, g, b = rows[y][3 * x:3 * x + 3]
    return (r, g, b)


def test_png_decodes_and_lights_the_curve(tmp_path: Path) -> None:
    points = [(0.0, 1.0), (10.0, 0.5), (20.0, 0.25), (40.0, 0.0)]
    data = line_chart_png(points, width=320, height=160)
    width, height, rows = decode_png(data)
    assert (width, height) == (320, 160)
    frame = frame_for(points, width=320, height=160)
    for x, y in points:
        assert pixel(rows, *frame.pixel(x, y)) == LINE, (x, y)
    mid = frame.pixel(15.0, 0.375)                  # on the straight segment between two points
    assert pixel(rows, *mid) == LINE
    assert pixel(rows, *frame.pixel(40.0, 1.0)) != LINE      # top right: nothing drawn there
    assert pixel(rows, *frame.pixel(0.0, 0.0)) == (0, 0, 0)   # the axes meet at the origin
    assert sum(pixel(rows, x, y) == LINE for y in range(height) for x in range(width)) > 250
    with pytest.raises(ValueError):
        line_chart_png(points, width=10, height=10)
    doc = {"id": "r1", "curve": [list(p) for p in points]}
    assert write_plot(doc, tmp_path / "c.png") == 4
    assert decode_png((tmp_path / "c.png").read_bytes())[:2] == (480, 240)
    with pytest.raises(CliError) as info:
        write_plot({"id": "r1", "curve": []}, tmp_path / "none.png")
    assert info.value.reason == "no_curve" and not (tmp_path / "none.png").exists()


# -- status rendering --------------------------------------------------------------------------


STATUS = {
    "id": "ro-3f2a", "name": "ui v4", "state": "running", "stage": 1, "reason": None,
    "stages": [
        {"index": 0, "size": 10, "members": 10, "applied": 10, "failed": 0, "pending": 0,
         "gates": {"health:app.crashes": {"ok": True, "value": 0, "limit": "le 0", "unknown": 0},
                   "applied": {"ok": True, "value": 1.0, "limit": 0.95},
                   "failed": {"ok": True, "value": 0.0, "limit": 0.05},
                   "smoke": {"ok": True, "value": {"passed": 10, "failed": 0}, "limit": "smoke"}},
         "started": 1000.0, "passed": 1003.0, "promoted": 1005.0},
        {"index": 1, "size": 25, "members": 15, "applied": 7, "failed": 1, "pending": 7,
         "gates": {"applied": {"ok": False, "value": 0.48, "limit": 0.95},
                   "failed": {"ok": True, "value": 0.04, "limit": 0.05},
                   "timeout": {"ok": True, "value": 12.5, "limit": 600}},
         "started": 1005.0, "passed": None, "promoted": None},
        {"index": 2, "size": 50, "members": 25, "applied": 0, "failed": 0, "pending": 0, "gates": {}},
        {"index": 3, "size": 100, "members": 50, "applied": 0, "failed": 0, "pending": 0, "gates": {}},
    ],
    "metrics": {"convergence_p50": 1.2, "convergence_p95": 2.9, "lambda": 0.35, "cpu_seconds": 0.42,
                "bytes_sent": 51234, "cost_ratio": 0.0031},
    "curve": [[t, math.exp(-0.35 * t)] for t in range(0, 12)],
}


def render(items: list[Any], width: int = 100) -> str:
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, width=width, emoji=False, highlight=False, color_system=None)
    for item in items:
        console.print(item)
    return out.getvalue()


def test_status_shows_stage_counts_gates_lambda_cost_and_chart() -> None:
    text = render(status_lines(STATUS), width=120)
    assert "rollout ro-3f2a ui v4  running  stage 2/4" in text
    assert "gates 0: ✓ health:app.crashes 0/le 0  ✓ applied 1/0.95  ✓ failed 0/0.05  ✓ smoke 10 passed 0 failed" \
        "  promoted" in text, text
    assert "gates 1: ✗ applied 0.48/0.95  ✓ failed 0.04/0.05  ✓ timeout 12.5/600" in text
    assert "λ 0.35/s (e halves in 1.98 s)" in text and "cost ratio 0.0031" in text and "51.2 kB" in text
    assert "p50 1.2 s  p95 2.9 s" in text
    assert "e(t): fraction of the target set not yet converged" in text
    assert sum(1 for ch in text if 0x2801 <= ord(ch) <= 0x28FF) > 10         # the chart has dots
    stage_rows = [x for x in text.splitlines() if x.lstrip().startswith(("0 canary", "▶ 1", "2 ", "3 "))]
    assert len(stage_rows) == 4, text
    aborted = dict(STATUS, state="rolled_back", reason="stage 0: max_failed 0.3 > 0.05", curve=[],
                   rollback={"devices": 10, "restored": 9, "failed": 1})
    text = render(status_lines(aborted))
    assert "rolled_back" in text and "reason: stage 0: max_failed 0.3 > 0.05" in text and "(no data)" in text
    assert "rollback: 9 of 10 device(s) restored, 1 failed" in text
    assert "▶" not in text
    assert max(len(x) for x in render(status_lines(STATUS), width=80).splitlines()) <= 80


def test_ls_table() -> None:
    rows = [{"id": "ro-1", "name": "ui v4", "state": "completed", "stage": 3, "stages": [10, 25, 50, 100],
             "counts": {"applied": 97, "failed": 2, "restored": 1}, "created": 1_000_000.0}]
    text = render([rollouts_table(rows, now=1_000_090.0)])
    assert "roll-outs (1)" in text and "ro-1" in text and "4/4" in text and "98/2/100" in text
    assert "1m ago" in text


# -- end to end on both brokers ----------------------------------------------------------------


class Rollouts:
    """An init'ed coordinator running in this process, ten phones in one group, the CLI pointed at it."""

    def __init__(self, coord: Any, url: str) -> None:
        self.coord = coord
        self.url = url
        self.configs: dict[str, list[Any]] = {}
        self.devices: list[Any] = []

    async def cli(self, *args: str, code: int = 0, as_json: bool = True) -> Any:
        """``autoglm rollout ARGS [--json]`` in a worker thread (the CLI runs its own event loop)."""
        import asyncio

        argv = ["rollout", *args, "--broker", self.url, *(["--json"] if as_json else [])]
        result = await asyncio.to_thread(runner.invoke, app, argv)
        assert result.exit_code == code, result.output
        if not as_json:
            return result
        doc = json.loads(result.stdout)
        return doc["result"] if code == 0 else dict(doc["error"], reason=doc["reason"])

    async def status_until(self, rid: str, check: Any, what: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll ``rollout status ID --json`` until ``check(doc)`` holds; the last document."""
        import asyncio

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            doc: dict[str, Any] = await self.cli("status", rid)
            if check(doc):
                return doc
            assert loop.time() < deadline, f"{what} did not happen within {timeout}s: {doc}"
            await asyncio.sleep(0.1)

    async def phones(self, n: int, group: str) -> None:
        from sdk.coord.device import Device
        from sdk.identity import Key

        for _ in range(n):
            key = Key.generate()
            self.configs[key.did] = []
            cred = self.coord.issue_device_credential(key.did, kind="phone", groups=[group])
            dev = Device(key, cred, broker=self.url, coordinator=self.coord.did,
                         on_config=self.configs[key.did].append)
            await dev.connect()
            self.devices.append(dev)
        for dev in self.devices:
            await dev.wait_admitted(15)


@pytest.fixture
async def rollouts(broker: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from sdk.coord.coordinator import Coordinator, load_config
    from tests.coord.test_daemon_ops import init_setup

    setup = init_setup(tmp_path, monkeypatch, broker=broker.url)
    coord = Coordinator.from_config(load_config(setup.config), broker=broker.url)
    await coord.start()
    env = Rollouts(coord, broker.url)
    try:
        yield env
    finally:
        for dev in env.devices:
            await dev.aclose()
        await coord.stop()


@pytest.mark.broker
@pytest.mark.timeout(180)
async def test_start_status_pause_resume_abort_from_the_cli(rollouts: Rollouts, tmp_path: Path) -> None:
    from sdk.coord.coordinator.rollouts import rank_key
    from tests.fixtures.waiting import until

    env = rollouts
    await env.phones(10, "room:ro")
    started = await env.cli("start", "group:room:ro", "ui.layout=v4", "--name", "layout v4", "--canary", "2",
                            "--steps", "50,100", "--bake", "1h", "--min-applied", "100%", "--max-failed", "0",
                            "--stage-timeout", "2m")
    assert started["stages"] == [2, 5, 10] and started["state"] == "running"
    rid = started["id"]
    canary = sorted(env.configs, key=lambda d: rank_key(rid, d))[:2]

    doc = await env.status_until(rid, lambda d: d["stages"][0]["passed"] is not None, "the canary's gates pass")
    assert doc["state"] == "running" and doc["stage"] == 0 and doc["stages"][0]["applied"] == 2
    assert {k: v["ok"] for k, v in doc["stages"][0]["gates"].items()} == {"applied": True, "failed": True,
                                                                           "timeout": True}
    for did, configs in env.configs.items():       # baking: only the canary has the change
        assert [c.state for c in configs] == ([{"ui.layout": "v4"}] if did in canary else []), did

    listed = await env.cli("ls", "--state", "running")
    assert [(r["id"], r["name"], r["stages"]) for r in listed["rollouts"]] == [(rid, "layout v4", [2, 5, 10])]
    text = await env.cli("status", rid, "--plot", str(tmp_path / "curve.png"), as_json=False)
    assert f"rollout {rid} layout v4  running  stage 1/3" in text.stdout
    assert "gates 0: ✓ applied 1/1  ✓ failed 0/0" in text.stdout and "e(t)" in text.stdout
    width, height, _ = decode_png((tmp_path / "curve.png").read_bytes())
    assert (width, height) == (480, 240)

    assert (await env.cli("pause", rid))["state"] == "paused"
    assert (await env.cli("resume", rid))["state"] == "running"
    aborted = await env.cli("abort", rid)
    assert aborted["state"] in ("aborted", "rolled_back") and aborted["reason"].startswith("aborted by")

    doc = await env.status_until(rid, lambda d: d["state"] == "rolled_back", "the canary is restored")
    for did in canary:                    # a new, higher version takes the key away again
        await until(lambda did=did: len(env.configs[did]) == 2, 15, what="restore applied")  # type: ignore[misc]
        first, second = env.configs[did]
        assert second.version > first.version and second.state == {}
    assert all(env.configs[d] == [] for d in env.configs if d not in canary)
    assert doc["rollback"] == {"devices": 2, "restored": 2, "failed": 0}

    again = await env.cli("resume", rid, code=1)
    assert again["reason"] == "invalid_state" and "autoglm rollout status" in again["hint"]
    missing = await env.cli("status", "ro-nope", code=1)
    assert missing["reason"] == "not_found" and "autoglm rollout ls" in missing["hint"]
    plain = await env.cli("status", "ro-nope", code=1, as_json=False)
    lines = plain.output.splitlines()
    assert lines[0].startswith("error: not_found:") and lines[1].startswith("hint: ") and len(lines) == 2

    watched = await env.cli("status", rid, "--watch", as_json=False)      # already final: one view
    assert watched.stdout.count(f"rollout {rid} layout v4  rolled_back") == 1

    done = await env.cli("start", "group:room:ro", "ui.layout=v5", "--canary", "20%", "--max-failed", "0",
                         "--watch")                                       # follows it to the end
    assert done["state"] == "completed" and done["counts"] == {"applied": 10}
    assert [s["size"] for s in done["stages"]] == [2, 10] and all(s["promoted"] for s in done["stages"])
    def all_on_v5() -> bool:
        return all(any(c.state == {"ui.layout": "v5"} for c in cs) for cs in env.configs.values())

    await until(all_on_v5, 15, what="v5 applied on every device")
