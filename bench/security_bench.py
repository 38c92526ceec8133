#!/usr/bin/env python3
"""Security benchmark: the cost of hostile input and of verification, and how fast revocation bites.

    python3 bench/security_bench.py                   # table
    python3 bench/security_bench.py --json out.json   # also write the figures ('-' for stdout)

1. Hostile messages, each at the envelope size limit (256 KB on the wire) and rejected by the
   envelope ``Verifier``: a ~180 KB did:key ``kid`` in the header (unauthenticated: the key is
   never resolved), a payload of deeply nested JSON and a payload with duplicate members (both
   validly signed by the attacker's own key, so they reach the payload parser). Per case: the
   median and worst rejection time, and what it was rejected as. Target < 5 ms each.
2. Envelope cost of a normal message (a small event body; plain and end-to-end encrypted):
   median ``Signer.seal`` and ``Verifier.open`` times over many messages, plus process CPU time
   per open (steadier than wall time on a shared machine), compared with ``--baseline`` (default:
   bench/results/security-before.json, measured on eacb135 before the trust-model changes): at most 10 %
   slower.
3. Revocation to refusal, on coordination and on the mesh: measured by ``revoke_to_refusal`` in
   bench/coord_bench.py and bench/mesh_bench.py when they define it (``revoke_to_refusal(broker=...)``,
   sync or async, returning seconds or a dict with ``seconds``); skipped otherwise. Target <= 1 s.

One run takes well under a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from sdk.identity import Key  # noqa: E402

try:
    from sdk.messaging import envelope
except ImportError:  # an older tree, where messaging lived in sdk.coord
    envelope = importlib.import_module("sdk.coord.envelope")

HOSTILE_TARGET_MS = 5.0
SLOWDOWN_LIMIT = 1.10  # envelope verify cost may grow by at most 10 % against the baseline
DEFAULT_BASELINE = HERE / "results" / "security-before.json"
REVOKE_TARGET_S = 1.0
TOPIC = "autoglm/v1/dev/bench/events"
BASE58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


# ------------------------------------------------------------------ hostile messages


def _b64(data: bytes) -> bytes:
    return envelope.b64e(data)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _fill_to(limit: int, build: Callable[[int], bytes]) -> bytes:
    """``build(n)`` for the largest ``n`` whose result fits in ``limit`` bytes (wire size)."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(build(mid)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return build(lo)


def _signed(key: Key, header: bytes, payload: bytes) -> bytes:
    signing_input = _b64(header) + b"." + _b64(payload)
    return signing_input + b"." + _b64(key.sign(signing_input))


def hostile_messages(limit: int) -> dict[str, bytes]:
    """The hostile wire messages, each as close to ``limit`` bytes as it gets."""
    attacker = Key.generate()
    header = _dumps({"alg": envelope.ALG, "kid": attacker.verification_method, "typ": envelope.TYP})
    now_ms = int(time.time() * 1000)
    base = {"id": "h" * 20, "typ": "event", "top": TOPIC, "iat": now_ms}
    kid_prefix = "did:key:z6Mk"

    def hostile_kid(n: int) -> bytes:
        kid_body = (BASE58 * (n // len(BASE58) + 1))[: max(n, 1)]
        kid = f"{kid_prefix}{kid_body}#{kid_prefix}{kid_body[:8]}"
        head = _dumps({"alg": envelope.ALG, "kid": kid, "typ": envelope.TYP})
        return _b64(head) + b"." + _b64(_dumps({**base, "body": {}})) + b"." + _b64(os.urandom(64))

    def nested(n: int) -> bytes:
        # {"id":...,"body":[[[[...]]]]}: depth n, far past any sane bound
        text = _dumps(base)[:-1] + b',"body":' + b"[" * n + b"]" * n + b"}"
        return _signed(attacker, header, text)

    def duplicates(n: int) -> bytes:
        # the same member many times over; a lax parser keeps the last one
        members = b",".join(b'"body":%d' % i for i in range(max(n, 1)))
        text = _dumps(base)[:-1] + b"," + members + b"}"
        return _signed(attacker, header, text)

    return {
        "hostile did:key kid (~180 KB)": _fill_to(min(limit, 180 * 1024 * 4 // 3 + 4096), hostile_kid),
        "nested JSON payload (signed)": _fill_to(limit, nested),
        "duplicate members (signed)": _fill_to(limit, duplicates),
    }


def _outcome(exc: BaseException | None) -> str:
    if exc is None:
        return "ACCEPTED"
    reason = getattr(exc, "reason", None)
    return f"{type(exc).__name__}({reason})" if reason else type(exc).__name__


def bench_hostile(*, budget_s: float = 2.0, max_reps: int = 200) -> list[dict[str, Any]]:
    """Median/worst time for a fresh ``Verifier`` (no caches) to reject each hostile message."""
    limit = envelope.DEFAULT_MAX_BYTES
    out = []
    for name, wire in hostile_messages(limit).items():
        times: list[float] = []
        outcome = ""
        started = time.perf_counter()
        while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - started < budget_s):
            verifier = envelope.Verifier()
            t0 = time.perf_counter()
            error: BaseException | None = None
            try:
                verifier.open(TOPIC, wire)
            except Exception as exc:  # noqa: BLE001 - every rejection type is an outcome here
                error = exc
            times.append((time.perf_counter() - t0) * 1000)
            outcome = _outcome(error)
        median = statistics.median(times)
        out.append({
            "case": name,
            "wire_bytes": len(wire),
            "reps": len(times),
            "median_ms": round(median, 3),
            "max_ms": round(max(times), 3),
            "outcome": outcome,
            "ok": outcome != "ACCEPTED" and median < HOSTILE_TARGET_MS,
        })
    return out


# ------------------------------------------------------------------ normal envelope cost


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_envelope(n: int) -> list[dict[str, Any]]:
    """Median seal and open times of a small event message, plain and encrypted."""
    sender, receiver = Key.generate(), Key.generate()
    signer = envelope.Signer(sender)
    body = {"type": "screen_available", "fields": {"width": 800, "height": 600}, "event_id": "e" * 22}
    out = []
    for label, encrypt_to in (("plain", None), ("encrypted", receiver.did)):
        verifier = envelope.Verifier(key=receiver)
        for _ in range(50):  # warm caches (header -> key, shared keys) as a live receiver has them
            verifier.open(TOPIC, signer.seal(TOPIC, body, type="event", encrypt_to=encrypt_to)[1])
        seal_us: list[float] = []
        wires: list[bytes] = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            _, wire = signer.seal(TOPIC, body, type="event", encrypt_to=encrypt_to)
            seal_us.append((time.perf_counter_ns() - t0) / 1000)
            wires.append(wire)
        open_us: list[float] = []
        cpu0 = time.process_time()
        for wire in wires:
            t0 = time.perf_counter_ns()
            verifier.open(TOPIC, wire)
            open_us.append((time.perf_counter_ns() - t0) / 1000)
        cpu_per_open = (time.process_time() - cpu0) / n * 1e6
        out.append({
            "message": label,
            "wire_bytes": len(wires[0]),
            "n": n,
            "seal_p50_us": round(statistics.median(seal_us), 1),
            "open_p50_us": round(statistics.median(open_us), 1),
            "open_p90_us": round(_percentile(open_us, 0.9), 1),
            "open_cpu_us": round(cpu_per_open, 1),
            "sign_open_p50_us": round(statistics.median(seal_us) + statistics.median(open_us), 1),
        })
    return out


# ------------------------------------------------------------------ revocation hooks


def _hook(module_name: str) -> Callable[..., Any] | None:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - a bench that cannot import is reported, not fatal
        print(f"  ({module_name}: not importable: {type(exc).__name__}: {exc})", file=sys.stderr)
        return None
    hook = getattr(module, "revoke_to_refusal", None)
    return hook if callable(hook) else None


def bench_revocation(brokers: list[str], timeout_s: float) -> list[dict[str, Any]]:
    """Call each available ``revoke_to_refusal`` hook once per broker."""
    out: list[dict[str, Any]] = []
    for layer, module_name in (("coordination", "coord_bench"), ("mesh", "mesh_bench")):
        hook = _hook(module_name)
        if hook is None:
            out.append({"layer": layer, "broker": "-", "seconds": None, "status": "skipped (no hook)"})
            continue
        for broker in brokers:
            row: dict[str, Any] = {"layer": layer, "broker": broker, "seconds": None}
            try:
                result = hook(broker=broker)
                if inspect.isawaitable(result):
                    result = asyncio.run(asyncio.wait_for(_awaited(result), timeout_s))
                seconds = result.get("seconds") if isinstance(result, dict) else result
                row["seconds"] = None if seconds is None else round(float(seconds), 3)
                if isinstance(result, dict):
                    row["detail"] = {k: v for k, v in result.items() if k != "seconds"}
                ok = row["seconds"] is not None and row["seconds"] <= REVOKE_TARGET_S
                row["status"] = "ok" if ok else "over target"
            except Exception as exc:  # noqa: BLE001 - a failing hook is a result, the run goes on
                row["status"] = f"error: {type(exc).__name__}: {exc}"
            out.append(row)
    return out


async def _awaited(aw: Any) -> Any:
    return await aw


# ------------------------------------------------------------------ report


def compare(report: dict[str, Any], baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """Open and seal+open p50 against a baseline run (ratio > 1: slower now)."""
    before = {r["message"]: r for r in baseline.get("envelope", [])}
    rows = []
    for now in report["envelope"]:
        old = before.get(now["message"])
        if old is None:
            continue
        for key in ("open_p50_us", "open_cpu_us", "sign_open_p50_us"):
            if old.get(key):
                ratio = now[key] / old[key]
                rows.append({"message": now["message"], "figure": key, "before": old[key], "now": now[key],
                             "ratio": round(ratio, 3), "ok": ratio <= SLOWDOWN_LIMIT})
    return rows



def _git_head() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE.parent, capture_output=True,
                              text=True, timeout=5, check=False)
    except OSError:
        return None
    return done.stdout.strip() or None


def print_tables(report: dict[str, Any]) -> None:
    print(f"\nhostile messages, rejected by the envelope Verifier (target < {HOSTILE_TARGET_MS} ms)")
    print(f"{'case':34} {'bytes':>7} {'reps':>5} {'median ms':>10} {'max ms':>8}  outcome")
    for r in report["hostile"]:
        mark = "" if r["ok"] else "  <-- over target" if r["outcome"] != "ACCEPTED" else "  <-- accepted!"
        print(f"{r['case']:34} {r['wire_bytes']:>7} {r['reps']:>5} {r['median_ms']:>10.3f} "
              f"{r['max_ms']:>8.3f}  {r['outcome']}{mark}")
    print("\nenvelope cost per message (p50, µs)")
    print(f"{'message':10} {'bytes':>6} {'n':>6} {'seal':>7} {'open':>7} {'open p90':>9} {'open cpu':>9} "
          f"{'seal+open':>10}")
    for r in report["envelope"]:
        print(f"{r['message']:10} {r['wire_bytes']:>6} {r['n']:>6} {r['seal_p50_us']:>7.1f} "
              f"{r['open_p50_us']:>7.1f} {r['open_p90_us']:>9.1f} {r['open_cpu_us']:>9.1f} "
              f"{r['sign_open_p50_us']:>10.1f}")
    if report.get("baseline"):
        print(f"\nagainst {report['baseline']['file']} (git {report['baseline']['git']}; "
              f"limit x{SLOWDOWN_LIMIT:.2f})")
        for r in report["baseline"]["rows"]:
            flag = "" if r["ok"] else "  <-- slower than allowed"
            print(f"{r['message']:10} {r['figure']:17} {r['before']:>8.1f} -> {r['now']:>8.1f}  "
                  f"x{r['ratio']:.3f}{flag}")
    print(f"\nrevoke -> first refusal (target <= {REVOKE_TARGET_S} s)")
    for r in report["revocation"]:
        seconds = "-" if r["seconds"] is None else f"{r['seconds']:.3f} s"
        print(f"{r['layer']:13} {r['broker']:10} {seconds:>10}  {r['status']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="messages per envelope-cost case")
    parser.add_argument("--brokers", nargs="+", default=["mosquitto", "embedded"],
                        help="brokers passed to the revocation hooks")
    parser.add_argument("--revoke-timeout", type=float, default=20.0, help="seconds allowed per hook call")
    parser.add_argument("--no-revocation", action="store_true", help="skip the revocation hooks")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON ('-' = stdout)")
    parser.add_argument("--label", help="a note stored with the figures (e.g. the tree measured)")
    parser.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE,
                        help="an earlier --json output to compare envelope costs with (default: %(default)s)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    report: dict[str, Any] = {
        "bench": "security",
        "git": _git_head(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "envelope_module": envelope.__name__,
        "label": args.label,
    }
    report["hostile"] = bench_hostile()
    report["envelope"] = bench_envelope(args.n)
    report["revocation"] = [] if args.no_revocation else bench_revocation(args.brokers, args.revoke_timeout)
    if args.baseline and args.baseline.is_file():
        old = json.loads(args.baseline.read_text(encoding="utf-8"))
        report["baseline"] = {"file": str(args.baseline), "git": old.get("git"), "rows": compare(report, old)}
    report["seconds"] = round(time.perf_counter() - started, 1)
    print_tables(report)
    print(f"\n({report['seconds']} s; git {report['git']}; load {report['load_avg']})")
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(text + "\n", encoding="utf-8")
    hostile_ok = all(r["ok"] for r in report["hostile"])
    return 0 if hostile_ok else 1


if __name__ == "__main__":
    sys.exit(main())
