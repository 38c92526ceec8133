#!/usr/bin/env python3
"""Identity hot path of a coordinator admission: CPU time per operation.

    python3 bench/identity_hotpath.py            # table
    python3 bench/identity_hotpath.py --json -   # also the figures as JSON ('-' for stdout)

Per admission a coordinator verifies the device's presentation (one embedded credential, every
signature checked: the verified-signature cache is cleared before each call, as for a device it
has not seen), resolves the device's did:key (a cache miss the first time) and signs its own
presentation. This measures those operations and their parts (base58, JCS) with
``time.process_time`` over a loop, so other jobs on a shared machine disturb the figures far
less than they would wall-clock rates. Figures are the median of ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdk.identity import (
    Key,
    TrustPolicy,
    create_presentation,
    issue_credential,
    verify_presentation,
)
from sdk.identity.hazmat.ed25519 import clear_cache
from sdk.identity.hazmat.jcs import canonicalize
from sdk.identity.hazmat.multibase import b58decode, b58encode
from sdk.identity.resolver import DidKeyResolver, _did_keys, resize_did_key_cache

V2 = "https://www.w3.org/ns/credentials/v2"
DOMAIN = "mesh.local"


def cpu_us(fn: Callable[[int], None], n: int, rounds: int) -> float:
    """Median over ``rounds`` of the process CPU microseconds ``fn`` spends per operation."""
    samples = []
    for _ in range(rounds):
        t0 = time.process_time()
        fn(n)
        samples.append((time.process_time() - t0) / n * 1e6)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every loop count")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", help="write the figures here ('-' for stdout)")
    args = ap.parse_args()

    coordinator, device = Key.generate(), Key.generate()
    credential = issue_credential(
        {"@context": [V2], "type": ["VerifiableCredential", "DeviceCredential"], "issuer": coordinator.did,
         "validFrom": "2024-01-01T00:00:00Z", "validUntil": "2099-01-01T00:00:00Z",
         "credentialSubject": {"id": device.did, "group": "floor-3", "tags": ["hvac", "sensor"]}},
        coordinator,
    )
    trust = TrustPolicy({coordinator.did: {"DeviceCredential"}})
    vp = create_presentation([credential], device, challenge="nonce-1", domain=DOMAIN)
    if not verify_presentation(vp, challenge="nonce-1", domain=DOMAIN, trust=trust).verified:
        raise SystemExit("benchmark presentation did not verify")
    if verify_presentation(vp, challenge="other", domain=DOMAIN, trust=trust).verified:
        raise SystemExit("a wrong challenge verified: the figures would mean nothing")

    def scaled(n: int) -> int:
        return max(1, int(n * args.scale))

    sig = bytes(range(64))
    key34 = b"\xed\x01" + bytes(device.public.raw)
    sig_text, key_text = b58encode(sig), b58encode(key34)
    vms = [Key.generate().verification_method for _ in range(scaled(20_000))]
    resize_did_key_cache(len(vms) + 1)
    resolver = DidKeyResolver()
    clear_did_key_cache = _did_keys.clear

    def did_key_misses(n: int) -> None:
        clear_did_key_cache()
        for vm in vms[:n]:
            resolver.resolve(vm).public_key.did  # noqa: B018  (the .did a verifier reads next)

    def loop(op: Callable[[], object]) -> Callable[[int], None]:
        def run(n: int) -> None:
            for _ in range(n):
                op()
        return run

    def verify_once() -> None:
        clear_cache()
        verify_presentation(vp, challenge="nonce-1", domain=DOMAIN, trust=trust)

    cases: list[tuple[str, Callable[[int], None], int]] = [
        ("b58encode 64 B (signature)", loop(lambda: b58encode(sig)), scaled(50_000)),
        ("b58encode 34 B (did:key)", loop(lambda: b58encode(key34)), scaled(50_000)),
        ("b58decode 88 chars", loop(lambda: b58decode(sig_text)), scaled(50_000)),
        ("b58decode 47 chars", loop(lambda: b58decode(key_text)), scaled(50_000)),
        ("did:key cache miss (+ .did)", did_key_misses, len(vms)),
        ("canonicalize(VP)", loop(lambda: canonicalize(vp)), scaled(20_000)),
        ("create_presentation", loop(lambda: create_presentation([credential], coordinator,
                                                                 challenge="c", domain=DOMAIN)), scaled(2_000)),
        ("verify_presentation (all signatures)", loop(verify_once), scaled(2_000)),
    ]
    figures = {}
    for name, fn, n in cases:
        figures[name] = round(cpu_us(fn, n, args.rounds), 2)
        print(f"{name:<40} {figures[name]:>10.2f} us CPU/op  (n={n}, median of {args.rounds})", flush=True)
    if args.json:
        text = json.dumps({"cpu_us_per_op": figures, "rounds": args.rounds, "scale": args.scale}, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
