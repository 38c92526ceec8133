"""In-process coordinator scale harness: the coordinator's own per-fleet costs, no broker.

    python3 bench/coord_scale.py [--sizes 1000,5000,10000] [--json out.json] [--profile out.prof]

Drives a real :class:`~sdk.coord.coordinator.Coordinator` (real SQLite store, real registry,
rules and metrics) without connecting it: the presentation check is replaced by a precomputed
result (its cost does not depend on the fleet) and configs are not published. For each fleet
size it reports

- admission: the coordinator's work per ``present`` (validate, persist, index, schedule), for
  the first and the last tenth of the fleet, and the process's peak RSS once all are admitted;
- sweep: one pass of the per-second loop (heartbeat expiry, credential expiry, state gauges)
  and one ``status.json`` write, with every device online;
- heartbeat, status-list update (a list no device uses, and one a tenth of the fleet uses),
  one report, and one event fanned out to every device (rules, commit, convergence start and
  every target's report: each config signed for its device by the real client, the broker
  write left out; one config's signature is also timed apart).

Times are CPU seconds of the process (``time.process_time``), so other load on the machine
inflates them less than wall-clock times. ``--profile`` writes a cProfile of the largest size's admissions and sweeps (read it with
``python3 -m pstats``).

``--memory 2000,5000`` measures the coordinator's own memory per device instead: real device keys,
credentials and presentations (made before tracing starts), each hello and present signed by its
device and opened by the coordinator's envelope verifier (header and replay caches), admitted
through ``_present`` with the real presentation check (a sweep after every 100, as the daemon's
per-second loop would), then a status write and one event to every device (configs signed, not
sent); ``tracemalloc`` snapshots at each size are grouped by the project code that made what is
still held. Identity- and messaging-layer caches are reported apart; at the end, the process's
RSS, after ``gc.freeze()`` and after glibc's ``malloc_trim(0)``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdk.coord import protocol
from sdk.coord.coordinator import Coordinator, daemon, parse_rules
from sdk.coord.coordinator.store import ConfigVersion
from sdk.coord.events import screen_available
from sdk.coord.handshake import Admitted
from sdk.identity import Key, TrustPolicy
from sdk.messaging.envelope import Signer

RULES = [{
    "name": "all", "event": "screen_available",
    "target": {"select": "capability", "capability": "display"},
    "config": {"ui.layout": "companion", "ui.width": "{event.width}"},
}]
LISTS = 10
#: CPU seconds of this process: the figures are the coordinator's work, not its wait for a busy machine
clock = time.process_time


def _did(i: int) -> str:
    return f"did:example:dev{i:07d}"


def _list_url(i: int) -> str:
    return f"https://issuer.example/status/{i % LISTS}"


def _admitted(i: int, valid_until: str) -> Admitted:
    did = _did(i)
    credential: dict[str, Any] = {"id": f"urn:uuid:cred-{i}", "validUntil": valid_until,
                  "credentialStatus": {"type": "BitstringStatusListEntry", "statusPurpose": "revocation",
                                       "statusListIndex": str(i), "statusListCredential": _list_url(i)}}
    subject = {"id": did, "kind": "display" if i % 2 else "phone", "groups": [f"room:{i % 100}"],
               "capabilities": ["display"]}
    return Admitted(did, credential, subject, "did:example:issuer", credential["id"])


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 1)


async def measure(n: int, prof: cProfile.Profile | None) -> dict[str, Any]:
    tmp = tempfile.TemporaryDirectory(prefix="coord-scale-")
    issuer, key = Key.generate(), Key.generate()
    coord = Coordinator(key, broker="mqtt://127.0.0.1:1", data_dir=Path(tmp.name), trust=TrustPolicy({}),
                        issuer=issuer, rules=parse_rules(RULES), heartbeat_ttl=600)
    coord.store = coord._open_store()
    published = [0]

    async def publish(topic: str, payload: bytes, **kw: Any) -> None:      # signed, not sent
        published[0] += 1

    coord.client.transport.publish = publish             # type: ignore[assignment]
    admitted = {_did(i): _admitted(i, "2099-01-01T00:00:00Z") for i in range(n)}
    daemon.check_presentation = lambda vp, **kw: admitted[kw["expected_holder"]]
    out: dict[str, Any] = {"devices": n}
    if prof is not None:
        prof.enable()
    times = []
    for i in range(n):
        did = _did(i)
        msg = SimpleNamespace(sender=did, body={"challenge": coord.challenges.issue(did), "vp": {},
                                                "last_version": 0})
        t0 = clock()
        await coord._present(msg)      # type: ignore[arg-type]
        times.append(clock() - t0)
    tenth = max(1, n // 10)
    out["max_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["admission_us"] = {"first_tenth": _us(statistics.fmean(times[:tenth])),
                           "last_tenth": _us(statistics.fmean(times[-tenth:]))}
    sweeps, writes = [], []
    for _ in range(5):
        coord._dirty = True
        t0 = clock()
        coord.sweep()
        sweeps.append(clock() - t0)
        t0 = clock()
        coord._write_status()
        writes.append(clock() - t0)
    out["sweep_ms"] = round(statistics.median(sweeps) * 1000, 3)
    out["status_write_ms"] = round(statistics.median(writes) * 1000, 3)
    out["status_bytes"] = (Path(tmp.name) / "status.json").stat().st_size
    if prof is not None:
        prof.disable()
    rec = coord.registry.get(_did(n // 2))
    assert rec is not None
    hb = SimpleNamespace(sender=rec.did, topic=protocol.device_presence(rec.token), type=protocol.HEARTBEAT,
                         body={}, retained=False)
    t0 = clock()
    for _ in range(1000):
        coord._on_presence(hb)       # type: ignore[arg-type]
    out["heartbeat_us"] = _us((clock() - t0) / 1000)
    t0 = clock()
    for _ in range(20):
        coord._on_status_list("https://issuer.example/status/unused", {})
    out["status_list_unused_us"] = _us((clock() - t0) / 20)
    coord.checker.check = lambda *a, **kw: None        # type: ignore[method-assign]  # nothing revoked
    t0 = clock()
    coord._on_status_list(_list_url(0), {})
    out["status_list_tenth_ms"] = round((clock() - t0) * 1000, 3)
    # one event to every device: rules, commit, convergence bookkeeping and every report
    event = screen_available(1920, 1080)
    t0 = clock()
    actions = coord.rules.evaluate(event, _did(1), coord.registry)
    merged = {did: (dict(a.changes), (a.rule,)) for a in actions for did in a.targets}
    t1 = clock()
    versions = coord.store.commit(merged, event_id="ev-0000001", event=(_did(1), event.type, event.fields))
    t2 = clock()
    await coord.push_desired("ev-0000001", versions)       # every target's pump: sign + publish
    t3 = clock()
    coord._reports = [(c.did, c.version, "applied", None, 1.0) for c in versions]
    coord._flush_reports()
    t4 = clock()
    assert not coord.metrics.pending, "event did not converge"
    assert published[0] == len(versions), published
    out["fanout"] = {"targets": len(versions), "rules_ms": round((t1 - t0) * 1000, 3),
                     "commit_ms": round((t2 - t1) * 1000, 3), "push_ms": round((t3 - t2) * 1000, 3),
                     "reports_ms": round((t4 - t3) * 1000, 3),
                     "per_target_us": _us((t4 - t0) / max(1, len(versions)))}
    signer = Signer(key)
    cv: ConfigVersion = versions[0]
    t0 = clock()
    for c in versions[:500]:
        signer.seal(protocol.device_config(protocol.token(c.did)), cv.to_body(), type=protocol.CONFIG)
    out["sign_config_us"] = _us((clock() - t0) / min(500, len(versions)))
    coord.store.close()
    tmp.cleanup()
    return out


def _owner(tb: Any) -> str:
    """The innermost frame in the project's code that is not a generic helper (JSON, base64)."""
    generic = ("hazmat/json.py", "hazmat/b64.py", "coordinator/values.py")
    for frame in reversed(tb):          # innermost first
        name = frame.filename.replace("\\", "/")
        if "/sdk/" in name and not name.endswith(generic):
            return f"{name.split('/sdk/', 1)[1]}:{frame.lineno}"
    return f"{tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}"


async def memory(sizes: list[int]) -> dict[str, Any]:
    """Per-device memory of a coordinator admitting real presentations (see the module doc)."""
    import ctypes
    import gc
    import tracemalloc

    from sdk.coord.coordinator.auth import device_credential, present
    from sdk.messaging.envelope import Message

    tmp = tempfile.TemporaryDirectory(prefix="coord-memory-")
    issuer = Key.generate()
    coord = Coordinator(Key.generate(), broker="mqtt://127.0.0.1:1", data_dir=Path(tmp.name), trust=TrustPolicy({}),
                        issuer=issuer, rules=parse_rules(RULES), heartbeat_ttl=600, max_admissions=10**6,
                        hello_burst=10**6)
    coord.store = coord._open_store()

    async def publish(topic: str, payload: bytes, **kw: Any) -> None:      # signed, not sent
        return None

    coord.client.transport.publish = publish             # type: ignore[assignment]
    topic = protocol.device_commands(protocol.token(coord.did))

    verifier = coord.client.verifier

    def message(key: Key, type_: str, body: Any) -> Message:
        """Signed by the device and opened by the coordinator's verifier (header and replay caches)."""
        _, wire = Signer(key).seal(topic, body, type=type_)
        return verifier.open(topic, wire)

    total = max(sizes)
    keys = [Key.generate() for _ in range(total)]
    creds = [device_credential(issuer, k.did, kind="display", groups=["room:1"], capabilities=["display"])
             for k in keys]
    tracemalloc.start(10)
    gc.collect()
    base = tracemalloc.take_snapshot()
    out: dict[str, Any] = {"sizes": []}
    done = 0
    for n in sorted(sizes):
        while done < n:
            batch = []
            for key, cred in zip(keys[done:n][:100], creds[done:n][:100], strict=True):
                challenge = coord._hello(message(key, protocol.HELLO, {}))["challenge"]
                vp = present(cred, key, challenge=challenge, domain=coord.did)
                batch.append(message(key, protocol.PRESENT, {"challenge": challenge, "vp": vp, "last_version": 0}))
            await asyncio.gather(*(coord._present(m) for m in batch))
            done += len(batch)
            batch.clear()                   # the messages (and their parsed bodies) are let go
            coord.sweep()                   # once a second in the daemon: sizes the per-sender caches
        coord._write_status()
        versions = coord.store.commit({r.did: ({"ui.width": n}, ("all",)) for r in coord.registry},
                                      event_id=f"ev-{n}")
        await coord.push_desired(f"ev-{n}", versions)
        coord._reports = [(c.did, c.version, "applied", None, 1.0) for c in versions]
        coord._flush_reports()
        del versions                    # the harness's own list of the configs pushed
        for _ in range(3):              # the loop lets go of the last step's handles (and their futures)
            await asyncio.sleep(0)
        gc.collect()
        snap = tracemalloc.take_snapshot()
        sites: dict[str, list[int]] = {}
        for diff in snap.compare_to(base, "traceback"):
            entry = sites.setdefault(_owner(diff.traceback), [0, 0])
            entry[0] += diff.size_diff
            entry[1] += diff.count_diff
        grown = sum(v[0] for v in sites.values())
        identity = sum(v[0] for k, v in sites.items() if k.startswith("identity/"))
        messaging = sum(v[0] for k, v in sites.items() if k.startswith("messaging/"))
        top = sorted(sites.items(), key=lambda kv: -kv[1][0])[:25]
        listed = [{"site": k, "bytes_per_device": round(v[0] / n), "blocks_per_device": round(v[1] / n, 2)}
                  for k, v in top]
        row = {"devices": n, "grown_kb": round(grown / 1024, 1), "bytes_per_device": round(grown / n),
               "identity_caches_bytes_per_device": round(identity / n),
               "messaging_caches_bytes_per_device": round(messaging / n), "rss_mb": _rss_mb(), "sites": listed}
        print(json.dumps({k: v for k, v in row.items() if k != "sites"}), flush=True)
        for site in listed[:18]:
            print(f"  {site['bytes_per_device']:>6} B/device {site['blocks_per_device']:>6} blocks  {site['site']}",
                  flush=True)
        out["sizes"].append(row)
    tracemalloc.stop()
    gc.collect()
    rss = {"rss_mb": _rss_mb()}
    gc.freeze()                         # what a daemon could do after start: no effect on RSS expected
    rss["after_gc_freeze_mb"] = _rss_mb()
    gc.unfreeze()
    ctypes.CDLL(None).malloc_trim(0)    # glibc hands free heap pages back
    rss["after_malloc_trim_mb"] = _rss_mb()
    print(json.dumps(rss), flush=True)
    out["rss"] = rss
    coord.store.close()
    tmp.cleanup()
    return out


def _rss_mb() -> float:
    """This process's resident set now (MB)."""
    with open("/proc/self/statm") as f:
        return round(int(f.read().split()[1]) * resource.getpagesize() / 2**20, 1)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.memory:
        return await memory([int(s) for s in args.memory.split(",")])
    sizes = [int(s) for s in args.sizes.split(",")]
    result: dict[str, Any] = {"machine": f"{platform.machine()} python {platform.python_version()}",
                              "sizes": []}
    for n in sizes:
        prof = cProfile.Profile() if args.profile and n == max(sizes) else None
        row = await measure(n, prof)
        print(json.dumps(row), flush=True)
        result["sizes"].append(row)
        if prof is not None:
            prof.dump_stats(args.profile)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--memory", help="sizes for the per-device memory breakdown instead (e.g. 2000,5000)")
    ns = parser.parse_args()
    res = asyncio.run(main(ns))
    if ns.json:
        ns.json.write_text(json.dumps(res, indent=1))
