#!/usr/bin/env python3
"""Identity benchmark: our ``verify_presentation`` against didkit 0.3.3's, same machine, same run.

    python3 bench/identity_bench.py                  # table
    python3 bench/identity_bench.py --json out.json  # also write the figures ('-' for stdout)

Ours: a presentation (eddsa-jcs-2022) holding 2 credentials, each with a Bitstring Status List
entry checked against a signed status list, under a trust policy. Every verification gets a
presentation it has not seen (own challenge, own holder signature; signed before timing):
  * ``fresh-vp``: credential signatures and the status list already verified and cached: what a
    verifier does on each DID Auth of a known device;
  * ``no-sig-cache``: the verified-signature cache cleared before each call, so all three
    signatures are checked every time (status list kept by the StatusChecker, as designed);
  * ``cold-status``: also a new StatusChecker each call: the status list is re-fetched,
    re-verified and re-decoded every time (worst case).
didkit: ``verifyPresentation`` of a didkit-issued LD presentation (Ed25519Signature2018) holding
one didkit-issued credential; didkit checks the presentation proof and challenge only, not the
credential inside nor any status. Awaited back to back on one event loop (its best case).
The headline ratio is ours ``no-sig-cache`` against didkit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdk.identity import (  # noqa: E402
    Key,
    StatusChecker,
    StatusList,
    TrustPolicy,
    create_presentation,
    create_status_list_credential,
    issue_credential,
    status_entry,
    verify_presentation,
)
from sdk.identity import didkit_backend  # noqa: E402
from sdk.identity.ed25519_fast import clear_cache  # noqa: E402

V1 = "https://www.w3.org/2018/credentials/v1"
V2 = "https://www.w3.org/ns/credentials/v2"
STATUS_URL = "https://issuer.example/status/1"
DOMAIN = "mesh.local"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn: Callable[[int], Any], seconds: float, *, min_iters: int = 20) -> tuple[int, float]:
    """Call ``fn(i)`` until ``seconds`` pass (at least ``min_iters`` times): (iterations, wall s)."""
    n, start = 0, time.perf_counter()
    while True:
        fn(n)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= min_iters:
            return n, elapsed


def ours(seconds: float) -> dict[str, dict[str, float]]:
    issuer, holder = Key.generate(), Key.generate()
    bits = StatusList()
    bits.set(7)  # someone else is revoked; ours (indexes 1 and 2) are not
    status_list = create_status_list_credential(issuer, STATUS_URL, status_list=bits)
    source = {STATUS_URL: status_list}
    creds = [
        issue_credential(
            {"@context": [V2], "type": ["VerifiableCredential", kind], "issuer": issuer.did,
             "validFrom": "2024-01-01T00:00:00Z", "validUntil": "2099-01-01T00:00:00Z",
             "credentialSubject": {"id": holder.did, "grant": kind}},
            issuer, credential_status=status_entry(STATUS_URL, index),
        )
        for index, kind in ((1, "DeviceCredential"), (2, "InferenceAccessCredential"))
    ]
    trust = TrustPolicy({issuer.did: {"DeviceCredential", "InferenceAccessCredential"}})
    # every presentation is fresh (own challenge and holder signature): sign enough up front
    # that no timed verification sees a presentation twice
    pool: list[tuple[str, Any]] = []

    def vp(i: int) -> tuple[str, Any]:
        while len(pool) <= i:
            nonce = f"nonce-{len(pool)}"
            pool.append((nonce, create_presentation(creds, holder, challenge=nonce, domain=DOMAIN)))
        return pool[i]

    checker = StatusChecker(source.get)

    def check(result: Any) -> None:
        if not result.verified or len(result.credentials) != 2:
            raise SystemExit(f"benchmark presentation did not verify: {result.errors}")

    def run_case(verify: Callable[[int], None], label: str) -> dict[str, float]:
        # sign the presentations outside the timed region, verify each once
        n_est = max(50, int(seconds * 4000))
        for i in range(n_est):
            vp(i)
        verify(0)  # warm-up on presentation 0 (then skipped)
        start = time.perf_counter()
        n = 1
        while n < n_est:
            verify(n)
            n += 1
            if time.perf_counter() - start >= seconds and n >= 20:
                break
        wall = time.perf_counter() - start
        log(f"ours {label}: {(n - 1) / wall:,.0f}/s")
        return {"iterations": n - 1, "seconds": wall, "per_s": (n - 1) / wall, "ms": 1000 * wall / (n - 1)}

    def fresh(i: int) -> None:
        nonce, pres = vp(i)
        check(verify_presentation(pres, challenge=nonce, domain=DOMAIN, trust=trust, status=checker))

    def no_sig_cache(i: int) -> None:
        clear_cache()
        nonce, pres = vp(i)
        check(verify_presentation(pres, challenge=nonce, domain=DOMAIN, trust=trust, status=checker))

    def cold_status(i: int) -> None:
        clear_cache()
        nonce, pres = vp(i)
        check(verify_presentation(pres, challenge=nonce, domain=DOMAIN, trust=trust,
                                  status=StatusChecker(source.get)))

    # a revoked credential must fail, or the figures mean nothing
    bits.set(1)
    revoked_list = create_status_list_credential(issuer, STATUS_URL, status_list=bits)
    nonce0, vp0 = vp(0)
    probe = verify_presentation(vp0, challenge=nonce0, domain=DOMAIN, trust=trust,
                                status=StatusChecker({STATUS_URL: revoked_list}.get))
    assert not probe.verified and "revoked" in probe.errors, probe.errors

    return {
        "fresh-vp": run_case(fresh, "fresh-vp"),
        "no-sig-cache": run_case(no_sig_cache, "no-sig-cache"),
        "cold-status": run_case(cold_status, "cold-status"),
    }


def didkit(seconds: float) -> dict[str, float] | None:
    if not didkit_backend.available():
        log("didkit not installed: skipping its side")
        return None
    import didkit as lib

    issuer, holder = Key.generate(), Key.generate()
    cred = didkit_backend.issue_ld_credential(
        {"@context": [V1], "type": ["VerifiableCredential"], "issuer": issuer.did,
         "issuanceDate": "2024-01-01T00:00:00Z", "credentialSubject": {"id": holder.did}},
        issuer,
    )
    vp = didkit_backend.issue_ld_presentation(
        {"@context": [V1], "type": ["VerifiablePresentation"], "holder": holder.did,
         "verifiableCredential": [cred]},
        holder, challenge="nonce-0", domain=DOMAIN,
    )
    vp_json = json.dumps(vp)
    options = json.dumps({"proofPurpose": "authentication", "challenge": "nonce-0", "domain": DOMAIN})
    wrong = json.dumps({"proofPurpose": "authentication", "challenge": "nonce-1", "domain": DOMAIN})

    async def run() -> tuple[int, float]:
        # the crash guard counts calls in flight; go through it for the checks, raw for the loop
        assert json.loads(await didkit_backend._call("verify_presentation", vp_json, options))["errors"] == []
        assert json.loads(await didkit_backend._call("verify_presentation", vp_json, wrong))["errors"]
        n, start = 0, time.perf_counter()
        while True:
            report = await lib.verify_presentation(vp_json, options)
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds and n >= 20:
                if json.loads(report)["errors"]:
                    raise SystemExit(f"didkit presentation did not verify: {report}")
                return n, elapsed

    didkit_backend.install_exit_guard()
    n, wall = asyncio.run(run())
    log(f"didkit: {n / wall:,.0f}/s")
    return {"iterations": n, "seconds": wall, "per_s": n / wall, "ms": 1000 * wall / n,
            "version": didkit_backend.version()}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per case")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON ('-' = stdout)")
    args = parser.parse_args()

    info = machine()
    log(f"machine: {info['cpu']} x{info['cores']}, Python {info['python']}")
    ours_figs = ours(args.seconds)
    theirs = didkit(args.seconds)

    rows = [(f"ours verify_presentation, 2 VCs + status, {k}", v) for k, v in ours_figs.items()]
    if theirs:
        rows.append(("didkit verifyPresentation, 1 LD VC, no VC/status checks", theirs))
    print(f"\nmachine: {info['cpu']} ({info['cores']} cores), Python {info['python']}")
    print(f"{'case':<62} {'per s':>10} {'ms/op':>8} {'vs didkit':>10}")
    print("-" * 93)
    for label, fig in rows:
        ratio = f"{fig['per_s'] / theirs['per_s']:.1f}x" if theirs else "-"
        print(f"{label:<62} {fig['per_s']:>10,.0f} {fig['ms']:>8.3f} {ratio:>10}")
    result: dict[str, Any] = {"machine": info, "ours": ours_figs, "didkit": theirs}
    if theirs:
        for name, fig in ours_figs.items():
            result[f"ratio_{name.replace('-', '_')}"] = fig["per_s"] / theirs["per_s"]
        ratio = result["ratio_no_sig_cache"]
        verdict = "meets" if ratio >= 10 else "MISSES"
        print(f"\nheadline (no-sig-cache vs didkit): {ratio:.1f}x: {verdict} the 10x target")
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
