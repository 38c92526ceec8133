"""The paho-mqtt internals the transport relies on, in one place, each with a public fallback.

paho 2.x has no public API for: the socket it writes to, how many packets are queued, whether
it is inside one of its own callbacks, reading exactly one packet, and changing the in-flight
window after CONNECT. The transport uses these for latency (batched, corked writes; bounded
reads) and correctness (the broker's Receive Maximum). If a paho release renames them, each
function falls back to behaviour that is slower but still correct, and logs once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _missing(name: str) -> None:
    if name not in _warned:
        _warned.add(name)
        log.warning("paho-mqtt has no %s: the transport falls back to its public API (slower)", name)


def socket_of(client: Any) -> Any:
    """The socket paho writes to (None when closed)."""
    return getattr(client, "_sock", None)


def forget_socket(client: Any, sock: Any) -> None:
    """Make paho drop ``sock`` without a DISCONNECT (the broker sees an unclean close)."""
    if getattr(client, "_sock", None) is sock:
        client._sock = None  # noqa: SLF001


def queued_packets(client: Any) -> int:
    """Packets waiting to be written (2 when unknown: the transport then takes the batched path)."""
    out = getattr(client, "_out_packet", None)
    if out is None:
        _missing("_out_packet")
        return 2
    return len(out)


def in_callback(client: Any) -> bool:
    """True while paho runs one of its callbacks (True when unknown: then writes are deferred)."""
    mutex = getattr(client, "_in_callback_mutex", None)
    if mutex is None:
        _missing("_in_callback_mutex")
        return True
    return bool(mutex.locked())


def packet_reader(client: Any) -> Callable[[], int] | None:
    """paho's read-one-packet function, or None (then use ``client.loop_read()``)."""
    reader = getattr(client, "_packet_read", None)
    if reader is None:
        _missing("_packet_read")
    return reader


def handle_read_error(client: Any, rc: int) -> None:
    """Let paho close the socket and call on_disconnect for a failed read."""
    handler = getattr(client, "_loop_rc_handle", None)
    if handler is None:
        _missing("_loop_rc_handle")
        client.loop_read()  # reads again, sees the error and handles it itself
        return
    handler(rc)


def set_max_inflight(client: Any, limit: int) -> None:
    """Set the in-flight window after CONNECT (paho's setter refuses once connected); 0 = none."""
    if hasattr(client, "_max_inflight_messages"):
        client._max_inflight_messages = limit  # noqa: SLF001
    else:
        _missing("_max_inflight_messages")


__all__ = ["socket_of", "forget_socket", "queued_packets", "in_callback", "packet_reader",
           "handle_read_error", "set_max_inflight"]
