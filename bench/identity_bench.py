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
The cases run interleaved in ``--rounds`` short rounds so load drift on a shared machine hits
both sides alike; figures are medians over rounds. Besides wall-clock rates it reports process
CPU time per operation (all threads, so didkit's tokio workers count), which other jobs on a
shared machine disturb far less. The headline ratio is ours ``no-sig-cache`` against didkit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
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
    didkit_backend,  # noqa: E402
    issue_credential,
    status_entry,
    verify_presentation,
)
from sdk.identity.hazmat.ed25519 import clear_cache  # noqa: E402

V1 = "https://www.w3.org/2018/credentials/v1"
V2 = "https://www.w3.org/ns/credentials/v2"
STATUS_URL = "https://issuer.example/status/1"
DOMAIN = "mesh.local"
Sample = tuple[int, float, float]  # operations, wall seconds, process CPU seconds (all threads)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Ours:
    """The presentation workload: issuer, holder, status list, 2 credentials, trust policy."""

    CASES = ("fresh-vp", "no-sig-cache", "cold-status")

    def __init__(self) -> None:
        self.issuer, self.holder = Key.generate(), Key.generate()
        bits = StatusList()
        bits.set(7)  # someone else is revoked; ours (indexes 1 and 2) are not
        self.source = {STATUS_URL: create_status_list_credential(self.issuer, STATUS_URL, status_list=bits)}
        self.creds = [
            issue_credential(
                {"@context": [V2], "type": ["VerifiableCredential", kind], "issuer": self.issuer.did,
                 "validFrom": "2024-01-01T00:00:00Z", "validUntil": "2099-01-01T00:00:00Z",
                 "credentialSubject": {"id": self.holder.did, "grant": kind}},
                self.issuer, credential_status=status_entry(STATUS_URL, index),
            )
            for index, kind in ((1, "DeviceCredential"), (2, "InferenceAccessCredential"))
        ]
        self.trust = TrustPolicy({self.issuer.did: {"DeviceCredential", "InferenceAccessCredential"}})
        self.checker = StatusChecker(self.source.get)
        self.serial = 0
        self._self_test(bits)

    def presentations(self, n: int) -> list[tuple[str, Any]]:
        """``n`` presentations never used before (own challenge, own holder signature)."""
        out = []
        for _ in range(n):
            self.serial += 1
            nonce = f"nonce-{self.serial}"
            out.append((nonce, create_presentation(self.creds, self.holder, challenge=nonce, domain=DOMAIN)))
        return out

    def verify(self, case: str, nonce: str, vp: Any) -> None:
        checker = self.checker
        if case != "fresh-vp":
            clear_cache()
        if case == "cold-status":
            checker = StatusChecker(self.source.get)
        result = verify_presentation(vp, challenge=nonce, domain=DOMAIN, trust=self.trust, status=checker)
        if not result.verified or len(result.credentials) != 2:
            raise SystemExit(f"benchmark presentation did not verify: {result.errors}")

    def _self_test(self, bits: StatusList) -> None:
        """A revoked credential and a wrong challenge must fail, or the figures mean nothing."""
        (nonce, vp), = self.presentations(1)
        self.verify("cold-status", nonce, vp)
        bits.set(1)
        revoked = {STATUS_URL: create_status_list_credential(self.issuer, STATUS_URL, status_list=bits)}
        probe = verify_presentation(vp, challenge=nonce, domain=DOMAIN, trust=self.trust,
                                    status=StatusChecker(revoked.get))
        assert not probe.verified and "revoked" in probe.errors, probe.errors
        probe = verify_presentation(vp, challenge="other", domain=DOMAIN, trust=self.trust,
                                    status=self.checker)
        assert not probe.verified and "wrong_challenge" in probe.errors, probe.errors

    def burst(self, case: str, seconds: float, expected_rate: float) -> Sample:
        """Verify fresh presentations (signed before timing) for ~``seconds``."""
        batch = self.presentations(max(20, int(seconds * expected_rate * 1.5)))
        start, cpu = time.perf_counter(), time.process_time()
        n = 0
        for nonce, vp in batch:
            self.verify(case, nonce, vp)
            n += 1
            if n >= 20 and time.perf_counter() - start >= seconds:
                break
        return n, time.perf_counter() - start, time.process_time() - cpu


class Didkit:
    """didkit's verifyPresentation on a didkit-issued LD VP with one didkit-issued credential."""

    def __init__(self) -> None:
        import didkit as lib

        self.lib = lib
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
        self.vp = json.dumps(vp)
        self.options = json.dumps(
            {"proofPurpose": "authentication", "challenge": "nonce-0", "domain": DOMAIN}
        )
        assert didkit_backend.verify_ld_presentation(vp, challenge="nonce-0", domain=DOMAIN) == (True, [])
        assert not didkit_backend.verify_ld_presentation(vp, challenge="nonce-1", domain=DOMAIN)[0]
        didkit_backend.install_exit_guard()
        self.loop = asyncio.new_event_loop()

    def burst(self, seconds: float) -> Sample:
        async def run() -> Sample:
            # each call is awaited to completion, so none is in flight when the loop returns
            # (the exit guard's drain covers the tokio threads' last touch)
            n, start, cpu = 0, time.perf_counter(), time.process_time()
            while True:
                report = await self.lib.verify_presentation(self.vp, self.options)
                n += 1
                if n >= 20 and time.perf_counter() - start >= seconds:
                    if json.loads(report)["errors"]:
                        raise SystemExit(f"didkit presentation did not verify: {report}")
                    return n, time.perf_counter() - start, time.process_time() - cpu

        return self.loop.run_until_complete(run())

    def close(self) -> None:
        self.loop.close()


def figures(samples: list[Sample]) -> dict[str, float]:
    """Medians over rounds: wall-clock rate, and CPU ms per operation (all threads)."""
    rates = [n / wall for n, wall, _ in samples]
    rate = statistics.median(rates)
    return {"per_s": rate, "ms": 1000 / rate,
            "cpu_ms": statistics.median(1000 * cpu / n for n, _, cpu in samples),
            "iterations": sum(n for n, _, _ in samples), "seconds": sum(w for _, w, _ in samples),
            "rounds": len(samples), "min_per_s": min(rates), "max_per_s": max(rates)}


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
            "platform": platform.platform(), "load_avg_1m": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="timed seconds per case, all rounds together")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median is reported)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON ('-' = stdout)")
    args = parser.parse_args()

    info = machine()
    log(f"machine: {info['cpu']} x{info['cores']}, Python {info['python']}, load {info['load_avg_1m']:.2f}")
    ours = Ours()
    theirs = Didkit() if didkit_backend.available() else None
    if theirs is None:
        log("didkit not installed: measuring our side only")
    burst = args.seconds / args.rounds
    samples: dict[str, list[Sample]] = {c: [] for c in (*Ours.CASES, "didkit")}
    rates = {c: 3000.0 for c in Ours.CASES}
    for case in Ours.CASES:  # warm-up, and a first rate estimate for batch sizes
        n, wall, _ = ours.burst(case, 0.2, rates[case])
        rates[case] = n / wall
    if theirs:
        theirs.burst(0.2)
    ratios: list[float] = []
    for r in range(args.rounds):
        for case in Ours.CASES:
            samples[case].append(ours.burst(case, burst, rates[case]))
        if theirs:
            samples["didkit"].append(theirs.burst(burst))
            n_o, w_o, _ = samples["no-sig-cache"][-1]
            n_d, w_d, _ = samples["didkit"][-1]
            ratios.append((n_o / w_o) / (n_d / w_d))
        log(f"round {r + 1}/{args.rounds} done")
    if theirs:
        theirs.close()

    ours_figs = {c: figures(samples[c]) for c in Ours.CASES}
    dk = figures(samples["didkit"]) if theirs else None
    if dk:
        dk["version"] = didkit_backend.version()
    rows = [(f"ours verify_presentation, 2 VCs + status, {c}", ours_figs[c]) for c in Ours.CASES]
    if dk:
        rows.append(("didkit verifyPresentation, 1 LD VC, no VC/status checks", dk))
    print(f"\nmachine: {info['cpu']} ({info['cores']} cores), Python {info['python']}, "
          f"load {info['load_avg_1m']:.2f}; median of {args.rounds} interleaved rounds")
    print(f"{'case':<62} {'per s':>9} {'ms/op':>8} {'vs didkit':>10} {'CPU ms/op':>10} {'CPU vs':>7}")
    print("-" * 111)
    for label, fig in rows:
        ratio = f"{fig['per_s'] / dk['per_s']:.1f}x" if dk else "-"
        cpu_ratio = f"{dk['cpu_ms'] / fig['cpu_ms']:.1f}x" if dk else "-"
        print(f"{label:<62} {fig['per_s']:>9,.0f} {fig['ms']:>8.3f} {ratio:>10} "
              f"{fig['cpu_ms']:>10.3f} {cpu_ratio:>7}")
    result: dict[str, Any] = {"machine": info, "ours": ours_figs, "didkit": dk}
    if dk:
        for c, fig in ours_figs.items():
            result[f"ratio_{c.replace('-', '_')}"] = fig["per_s"] / dk["per_s"]
            result[f"cpu_ratio_{c.replace('-', '_')}"] = dk["cpu_ms"] / fig["cpu_ms"]
        head = statistics.median(ratios)
        result["ratio_headline_median_of_rounds"] = head
        verdict = "meets" if head >= 10 else "MISSES"
        print(f"\nheadline: no-sig-cache vs didkit, median of per-round ratios: {head:.1f}x "
              f"(rounds {min(ratios):.1f}x..{max(ratios):.1f}x): {verdict} the 10x target; "
              f"CPU time per op: {result['cpu_ratio_no_sig_cache']:.1f}x")
    if args.json:
        text = json.dumps(result, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
