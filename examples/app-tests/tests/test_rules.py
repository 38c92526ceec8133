"""The app's coordinator rule: who gets a config, and what it says."""

from __future__ import annotations

from roomapp import RULES


async def test_only_phones_in_the_displays_room_are_targeted(autoglm_coordinator, autoglm_device):
    coordinator = await autoglm_coordinator(rules=RULES)
    living, kitchen = [], []
    phone = await autoglm_device(kind="phone", groups=["room:living"], on_config=living.append)
    await autoglm_device(kind="phone", groups=["room:kitchen"], on_config=kitchen.append)
    display = await autoglm_device(kind="display", groups=["room:living"])

    await display.screen_available(800, 600)

    converged = await autoglm_coordinator.wait_for("converged")   # every target reported back
    assert converged["targets"] == 1 and converged["failures"] == 0
    assert [c.state["ui.layout"] for c in living] == ["companion"]
    assert kitchen == []
    row = next(d for d in coordinator.status()["devices"] if d["did"] == phone.did)
    assert row["desired_version"] == row["reported_version"] == 1


async def test_a_small_screen_is_ignored(autoglm_coordinator, autoglm_device):
    await autoglm_coordinator(rules=RULES)
    got = []
    await autoglm_device(kind="phone", groups=["room:living"], on_config=got.append)
    display = await autoglm_device(kind="display", groups=["room:living"])

    event_id = await display.screen_available(240, 160)       # below the rule's width >= 320

    info = await autoglm_coordinator.wait_for("event", lambda i: i.get("event_id") == event_id)
    assert info["targets"] == []                                # the rule matched no one
    assert got == []
