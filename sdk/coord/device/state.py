"""The device's connection state: one enum and the transitions allowed between its members.

    CLOSED ──connect()──▶ CONNECTING ──▶ AUTHENTICATING ──▶ ADMITTED
                                            │  ▲               │ reauth notice, reconnect,
                                            ▼  │               ▼ coordinator restarted
                                          WAITING ◀──────── REAUTHENTICATING ──▶ ADMITTED
    any ──revoked──▶ REVOKED      any ──credential expired, none fresher──▶ EXPIRED
    any ──aclose()──▶ CLOSED

WAITING: connected but not admitted, until the coordinator comes back (its presence says
online) or the app calls ``authenticate()``. EXPIRED: the coordinator refused the credential
as expired and no fresh one was available; ``Device.update_credential()`` resumes. REVOKED is
final for automatic transitions; only an explicit ``authenticate()`` may try again.
"""

from __future__ import annotations

import enum


class DeviceState(enum.StrEnum):
    """Where a device stands with the coordinator (``Device.state``); compares equal to its value."""

    CLOSED = "closed"
    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    ADMITTED = "admitted"
    WAITING = "waiting"
    REAUTHENTICATING = "reauthenticating"
    EXPIRED = "expired"
    REVOKED = "revoked"


_S = DeviceState

#: state -> the states it may move to
TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    _S.CLOSED: frozenset({_S.CONNECTING}),
    _S.CONNECTING: frozenset({_S.AUTHENTICATING, _S.WAITING, _S.CLOSED}),
    _S.AUTHENTICATING: frozenset({_S.ADMITTED, _S.WAITING, _S.EXPIRED, _S.REVOKED, _S.CLOSED}),
    _S.ADMITTED: frozenset({_S.AUTHENTICATING, _S.REAUTHENTICATING, _S.WAITING, _S.EXPIRED, _S.REVOKED,
                            _S.CLOSED}),
    _S.WAITING: frozenset({_S.AUTHENTICATING, _S.REAUTHENTICATING, _S.EXPIRED, _S.REVOKED, _S.CLOSED}),
    _S.REAUTHENTICATING: frozenset({_S.ADMITTED, _S.EXPIRED, _S.REVOKED, _S.CLOSED}),
    _S.EXPIRED: frozenset({_S.AUTHENTICATING, _S.REAUTHENTICATING, _S.REVOKED, _S.CLOSED}),
    _S.REVOKED: frozenset({_S.AUTHENTICATING, _S.CLOSED}),
}

#: states in which the device will not become admitted without the app doing something
STUCK = frozenset({_S.CLOSED, _S.EXPIRED, _S.REVOKED})


def allowed(old: DeviceState, new: DeviceState) -> bool:
    """True when ``old -> new`` is a transition of the device state machine."""
    return new in TRANSITIONS[old]


__all__ = ["DeviceState", "TRANSITIONS", "STUCK", "allowed"]
