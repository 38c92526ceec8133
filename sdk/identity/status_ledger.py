"""Status-list indexes for credentials issued offline (``autoglm vc issue``), never colliding with
the indexes a coordinator allocates for the same issuer.

One issuer's status list (:func:`sdk.messaging.status.status_list_url`, 131072 bits by default)
is shared by two allocators:

- the coordinator (``[issuer]``), from its store, in :data:`COORDINATOR_RANGES`: ``[0, 65536)``
  and, when its list is larger, ``[131072, size)``;
- offline issuance, from a ledger file next to the issuer's keystore
  (``<keystore>.status-ledger.json``), in :data:`OFFLINE_RANGE` = ``[65536, 131072)``, handed
  out in order. The ledger refuses an explicit index it already handed out, or one outside the
  offline range. Keep it (and back it up) with the keystore: it is the only record of which
  offline indexes are taken.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sdk.identity.errors import IdentityError
from sdk.identity.hazmat import json as strict_json

log = logging.getLogger(__name__)

#: indexes offline issuance (the CLI) hands out
OFFLINE_RANGE = range(65536, 131072)
#: where a coordinator allocates: below the offline range, and above it when its list is larger
COORDINATOR_RANGES = (range(0, OFFLINE_RANGE.start), range(OFFLINE_RANGE.stop, 1 << 24))
LEDGER_SUFFIX = ".status-ledger.json"


class StatusLedgerError(IdentityError):
    """The index ledger is unreadable, full, or refuses an index (``reason`` says which)."""

    reason = "status_ledger"


def ledger_path(keystore: str | os.PathLike[str]) -> Path:
    """The ledger file that goes with ``keystore``."""
    p = Path(keystore)
    return p.with_name(p.name + LEDGER_SUFFIX)


class StatusLedger:
    """The offline-issuance index ledger of one keystore (one section per issuer DID)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The ledger document under an exclusive lock; written back atomically on success."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            doc = self._read()
            yield doc
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, self.path)

    def _read(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"issuers": {}}
        try:
            doc = strict_json.loads(self.path.read_bytes())
            if not isinstance(doc, dict) or not isinstance(doc.get("issuers"), dict):
                raise ValueError("not a ledger document")
        except (OSError, ValueError) as exc:
            log.error("status index ledger %s unreadable: %s", self.path, exc)
            raise StatusLedgerError(f"status index ledger {self.path} is unreadable ({exc}); restore it from "
                                    "a backup (indexes handed out before must not be reused)",
                                    reason="ledger_corrupt") from exc
        return doc

    def allocate(self, issuer: str, *, subject: str, credential_id: str | None = None,
                 index: int | None = None) -> int:
        """Record and return an index for ``subject`` (the next free one unless ``index`` is given)."""
        with self._locked() as doc:
            section = doc["issuers"].setdefault(issuer, {"next": OFFLINE_RANGE.start, "issued": {}})
            issued: dict[str, Any] = section["issued"]
            if index is None:
                index = max(int(section.get("next", OFFLINE_RANGE.start)), OFFLINE_RANGE.start)
                while str(index) in issued:
                    index += 1
                if index not in OFFLINE_RANGE:
                    raise StatusLedgerError(f"every offline status index of {issuer} is used "
                                            f"({len(OFFLINE_RANGE)}); issue through the coordinator",
                                            reason="status_list_full")
                section["next"] = index + 1
            else:
                if index not in OFFLINE_RANGE:
                    raise StatusLedgerError(
                        f"status index {index} is outside the offline range [{OFFLINE_RANGE.start}, "
                        f"{OFFLINE_RANGE.stop}) (the coordinator allocates the rest of this list)",
                        reason="index_reserved")
                if str(index) in issued:
                    prev = issued[str(index)]
                    raise StatusLedgerError(f"status index {index} was already given to "
                                            f"{prev.get('subject')} ({prev.get('id')})", reason="index_in_use")
            issued[str(index)] = {"subject": subject, "id": credential_id,
                                  "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        log.info("status index %d of %s recorded for %s in %s", index, issuer, subject, self.path)
        return index

    def issued(self, issuer: str) -> dict[int, dict[str, Any]]:
        """Every index recorded for ``issuer``."""
        section = self._read()["issuers"].get(issuer, {})
        return {int(k): dict(v) for k, v in dict(section.get("issued", {})).items()}


__all__ = ["COORDINATOR_RANGES", "OFFLINE_RANGE", "LEDGER_SUFFIX", "StatusLedger", "StatusLedgerError",
           "ledger_path"]
