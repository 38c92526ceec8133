"""The device's outbox journal in a running device: acknowledged events leave, the file stays small."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from sdk.coord.device.outbox import Outbox, read_journal
from sdk.coord.events import battery
from tests.coord.test_coordinator import Mesh, mesh, until  # noqa: F401 - the fixture

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


async def test_acknowledged_events_are_compacted_away_off_the_loop(mesh: Mesh, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    await mesh.start_coordinator()
    display = await mesh.device("display", state_file=tmp_path / "display.json")
    journal = tmp_path / "display.outbox.jsonl"
    threads: list[str] = []
    real = Outbox.compact

    def compact(self: Outbox) -> None:          # the real compaction, noting where it runs
        threads.append(threading.current_thread().name)
        real(self)

    monkeypatch.setattr(Outbox, "compact", compact)
    for _ in range(80):
        await display.publish_event(battery("low"))
    await until(lambda: display.outbox == [] and threads != [])
    assert threading.main_thread().name not in threads       # never on the event loop's thread
    await until(lambda: not display._outbox.compact_due)
    assert read_journal(journal) == [] and len(journal.read_bytes().splitlines()) < 80
