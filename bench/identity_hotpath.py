#!/usr/bin/env python3
"""Identity hot path of a coordinator admission: process CPU per operation, before and after.

    python3 bench/identity_hotpath.py [--rounds 15] [--baseline-rev af62577] [--json FILE|-]

Per admission a coordinator verifies the device's presentation (one embedded credential; every
signature checked: the verified-signature cache is cleared before each call, as for a device it
has not seen), resolves the device's did:key (a cache miss the first time) and signs its own
presentation. This times those operations and their parts (base58, JCS) with
``time.process_time`` over short loops.

``baseline``: this checkout's ``sdk`` copied to a temporary package ``sdk_baseline`` with the
identity hot-path modules (``--baseline-files``) as of ``--baseline-rev``, its imports renamed;
both are imported into this one process and every round runs each operation on both sides back
to back, so load from other jobs on a shared machine falls on both alike. Figures: the medians
over rounds, in microseconds of process CPU per operation. ``--baseline-rev ''`` skips it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
V2 = "https://www.w3.org/ns/credentials/v2"
DOMAIN = "mesh.local"
HOT_PATH_FILES = (
    "sdk/identity/hazmat/multibase.py",
    "sdk/identity/hazmat/jcs.py",
    "sdk/identity/did_key.py",
    "sdk/identity/resolver.py",
)
Case = tuple[Callable[[int], None], int]


def make_baseline(rev: str, files: list[str], into: Path) -> None:
    """``into/sdk_baseline``: this checkout's sdk with ``files`` as of ``rev``, imports renamed."""
    pkg = into / "sdk_baseline"
    shutil.copytree(ROOT / "sdk", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for name in files:
        old = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"],
                             check=True, capture_output=True, text=True).stdout
        (pkg / Path(name).relative_to("sdk")).write_text(old)
    rename = re.compile(r"\b(from|import) sdk([. ])")
    for path in pkg.rglob("*.py"):
        text = path.read_text()
        path.write_text(rename.sub(r"\1 sdk_baseline\2", text).replace('"sdk.', '"sdk_baseline.'))


def cases(pkg: str) -> dict[str, Case]:
    """The timed operations, on package ``pkg`` (``sdk`` or ``sdk_baseline``)."""
    identity = importlib.import_module(f"{pkg}.identity")
    ed25519 = importlib.import_module(f"{pkg}.identity.hazmat.ed25519")
    jcs = importlib.import_module(f"{pkg}.identity.hazmat.jcs")
    mb = importlib.import_module(f"{pkg}.identity.hazmat.multibase")
    resolver = importlib.import_module(f"{pkg}.identity.resolver")
    coordinator, device = identity.Key.from_seed(b"\1" * 32), identity.Key.from_seed(b"\2" * 32)
    credential = identity.issue_credential(
        {"@context": [V2], "type": ["VerifiableCredential", "DeviceCredential"], "issuer": coordinator.did,
         "validFrom": "2024-01-01T00:00:00Z", "validUntil": "2099-01-01T00:00:00Z",
         "credentialSubject": {"id": device.did, "group": "floor-3", "tags": ["hvac", "sensor"]}},
        coordinator,
    )
    trust = identity.TrustPolicy({coordinator.did: {"DeviceCredential"}})
    vp = identity.create_presentation([credential], device, challenge="nonce-1", domain=DOMAIN)
    if identity.verify_presentation(vp, challenge="other", domain=DOMAIN, trust=trust).verified:
        raise SystemExit("a wrong challenge verified: the figures would mean nothing")
    vms = [identity.Key.from_seed(i.to_bytes(32, "big")).verification_method for i in range(1, 2001)]
    resolver.resize_did_key_cache(len(vms) * 2)
    did_keys = resolver.DidKeyResolver()
    sig, key34 = bytes(range(64)), b"\xed\x01" + bytes(device.public.raw)
    sig_text = mb.b58encode(sig)

    def loop(op: Callable[[], object]) -> Callable[[int], None]:
        def run(n: int) -> None:
            for _ in range(n):
                op()
        return run

    def verify() -> None:
        ed25519.clear_cache()
        if not identity.verify_presentation(vp, challenge="nonce-1", domain=DOMAIN, trust=trust).verified:
            raise SystemExit("benchmark presentation did not verify")

    def misses(n: int) -> None:
        resolver._did_keys.clear()
        for vm in vms[:n]:
            did_keys.resolve(vm).public_key.did  # noqa: B018  (the key's DID, as a caller reads it)

    def hits(n: int) -> None:
        for vm in vms[:n]:
            did_keys.resolve(vm)

    return {
        "b58encode 64 B (proofValue)": (loop(lambda: mb.b58encode(sig)), 5000),
        "b58encode 34 B (did:key)": (loop(lambda: mb.b58encode(key34)), 5000),
        "b58decode 88 chars": (loop(lambda: mb.b58decode(sig_text)), 5000),
        "did:key cache miss (+ .did)": (misses, len(vms)),
        "did:key cache hit": (hits, len(vms)),
        "canonicalize(VP)": (loop(lambda: jcs.canonicalize(vp)), 2000),
        "create_presentation": (loop(lambda: identity.create_presentation(
            [credential], coordinator, challenge="c", domain=DOMAIN)), 300),
        "verify_presentation": (loop(verify), 300),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--baseline-rev", default="af62577", help="git revision of the baseline files ('' for none)")
    ap.add_argument("--baseline-files", nargs="+", default=list(HOT_PATH_FILES))
    ap.add_argument("--json", help="write the figures here ('-' for stdout)")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    sides: dict[str, dict[str, Case]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.baseline_rev:
            make_baseline(args.baseline_rev, args.baseline_files, Path(tmp))
            sys.path.insert(0, tmp)
            sides["baseline"] = cases("sdk_baseline")
        sides["current"] = cases("sdk")
        samples: dict[str, dict[str, list[float]]] = {side: {k: [] for k in sides["current"]} for side in sides}
        for _ in range(args.rounds):
            for name in sides["current"]:
                for side, ops in sides.items():
                    fn, n = ops[name]
                    t0 = time.process_time()
                    fn(n)
                    samples[side][name].append((time.process_time() - t0) / n * 1e6)
    figures: dict[str, Any] = {}
    for name in sides["current"]:
        row = {side: round(statistics.median(samples[side][name]), 2) for side in sides}
        if "baseline" in row:
            row["speedup"] = round(row["baseline"] / row["current"], 2)
            print(f"{name:<30} {row['baseline']:9.2f} -> {row['current']:9.2f} us CPU/op  {row['speedup']:.2f}x")
        else:
            print(f"{name:<30} {row['current']:9.2f} us CPU/op")
        figures[name] = row
    if args.json:
        text = json.dumps({"cpu_us_per_op": figures, "rounds": args.rounds, "baseline_rev": args.baseline_rev,
                           "baseline_files": args.baseline_files, "python": sys.version.split()[0]}, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
