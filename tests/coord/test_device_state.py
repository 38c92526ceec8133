"""The device state machine on a real broker: every change goes through one logged transition."""

from __future__ import annotations

import logging
import re

import pytest

from sdk.coord.device import DeviceState
from tests.coord.test_coordinator import Mesh, mesh, until  # noqa: F401 - the fixture

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]

_TRANSITION = re.compile(r"^device (\S+): (\w+) -> (\w+)")


def _transitions(caplog: pytest.LogCaptureFixture, did: str) -> list[tuple[str, str]]:
    out = []
    for record in caplog.records:
        m = _TRANSITION.match(record.getMessage())
        if m and m.group(1) == did:
            out.append((m.group(2), m.group(3)))
    return out


async def test_states_through_a_coordinator_restart(mesh: Mesh, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sdk.coord.device.client")
    coord = await mesh.start_coordinator()
    display = await mesh.device("display")
    assert display.state is DeviceState.ADMITTED and display.state == "admitted"
    await coord.stop()
    await until(lambda: display.state is DeviceState.WAITING)
    assert display.state_reason == "coordinator offline"
    await mesh.start_coordinator()
    await display.wait_admitted(15)
    await display.aclose()
    assert _transitions(caplog, display.did) == [
        ("closed", "connecting"), ("connecting", "authenticating"), ("authenticating", "admitted"),
        ("admitted", "waiting"), ("waiting", "reauthenticating"), ("reauthenticating", "admitted"),
        ("admitted", "closed"),
    ]


async def test_revocation_is_final_for_automatic_transitions(mesh: Mesh) -> None:
    coord = await mesh.start_coordinator()
    tablet = await mesh.device("tablet")
    await coord.revoke(tablet.did)
    await until(lambda: tablet.state is DeviceState.REVOKED, timeout=5)
    tablet._on_reconnect(False)                              # what a broker reconnect does
    tablet._on_notice("reauth", "not_admitted")              # a reauth notice
    assert tablet.state is DeviceState.REVOKED and tablet._reauth is None
