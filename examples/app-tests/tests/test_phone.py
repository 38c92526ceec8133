"""The phone UI on a real coordinator and broker: it follows the display in its room."""

from __future__ import annotations

from roomapp import RULES, PhoneUI


async def test_phone_switches_to_companion_layout_and_back(autoglm_coordinator, autoglm_device):
    await autoglm_coordinator(rules=RULES)
    ui = PhoneUI()
    phone = await autoglm_device(kind="phone", groups=["room:living"], on_config=ui.on_config)
    display = await autoglm_device(kind="display", groups=["room:living"])

    await display.screen_available(1280, 720)
    await phone.wait_version(1, timeout=10)
    assert (ui.layout, ui.resolution) == ("companion", "1280x720")

    await display.screen_lost()
    await phone.wait_version(2, timeout=10)
    assert (ui.layout, ui.resolution) == ("standalone", None)
    assert ui.versions == [1, 2]


async def test_a_revoked_phone_is_disconnected(autoglm_coordinator, autoglm_device, autoglm_issuer):
    coordinator = await autoglm_coordinator(rules=RULES)
    phone = await autoglm_device(kind="phone", groups=["room:living"])

    await autoglm_issuer.revoke(phone.did)             # publishes the issuer's status list

    await autoglm_coordinator.wait_for("revoked", lambda info: info["did"] == phone.did)
    row = next(d for d in coordinator.status()["devices"] if d["did"] == phone.did)
    assert row["state"] == "revoked"
