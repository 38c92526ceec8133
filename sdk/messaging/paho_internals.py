"""The paho-mqtt internals the transport relies on, in one place, each with a public fallback.

paho 2.x has no public API for: the socket it writes to, how many packets are queued, whether
it is inside one of its own callbacks, reading exactly one packet, and changing the in-flight
window after CONNECT, when its keepalive next falls due, and taking a socket opened elsewhere. The transport uses these for latency (batched, corked writes; bounded
reads) and correctness (the broker's Receive Maximum). If a paho release renames them, each
function falls back to behaviour that is slower but still correct, and logs once.

Property tables: paho builds an MQTT 5 ``Properties`` object for every PUBLISH and PUBACK it
reads, and each ``Properties.__init__`` rebuilds three constant tables (``types``, ``names``,
``properties``: two 27-entry dicts and a list); each ``unpack()`` starts with ``clear()``, which
loops over all 27 names with ``str.replace`` + ``hasattr``. At fleet scale that is about a tenth
of a coordinator's CPU. :func:`share_property_tables` builds the tables once from a real instance
and makes every instance point at them, and makes ``clear()`` delete only the properties that are
set. Nothing in paho writes to those tables after ``__init__`` (``__setattr__`` stores them as
private variables, every other method only reads them), so sharing them changes no behaviour.
It is applied only when the installed paho is 2.x and a freshly built original instance of every
packet type holds exactly the shared tables; otherwise paho is left alone (and that is logged once).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt
import paho.mqtt.client as paho_client
from paho.mqtt.matcher import MQTTMatcher
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)
_warned: set[str] = set()


def _missing(name: str) -> None:
    if name not in _warned:
        _warned.add(name)
        log.warning("paho-mqtt has no %s: the transport falls back to its public API (slower)", name)


def _unknown_layout(cls: str, consequence: str) -> None:
    if cls not in _warned:
        _warned.add(cls)
        log.warning("paho-mqtt %s: unknown %s layout; %s (slower)", paho.mqtt.__version__, cls, consequence)


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
    """Let paho close the socket and call on_disconnect for a failed read or write."""
    handler = getattr(client, "_loop_rc_handle", None)
    if handler is None:
        _missing("_loop_rc_handle")
        client.loop_read()  # reads again, sees the error and handles it itself
        return
    handler(rc)


def keepalive_due(client: Any) -> float:
    """When paho's keepalive check may next act (``time.monotonic()`` time): the link's last
    traffic out or in plus the keepalive, or an outstanding ping's deadline. One second from now
    when unknown (then the transport simply looks every second)."""
    now = time.monotonic()
    try:
        keepalive = client._keepalive  # noqa: SLF001
        last = min(client._last_msg_out, client._last_bytes_received)  # noqa: SLF001
        ping_t = client._ping_t  # noqa: SLF001
    except AttributeError:
        _missing("_keepalive/_last_msg_out/_last_bytes_received/_ping_t")
        return now + 1.0
    if not keepalive:
        return now + 60.0               # no keepalive: nothing falls due (the slot is cheap)
    due = last + keepalive
    if ping_t:
        due = min(due, ping_t + keepalive)
    return max(due, now)


class _FilteredCallbacks(MQTTMatcher):
    """paho's per-topic callbacks (``message_callback_add``); with none, a lookup is no walk."""

    def iter_match(self, topic: str) -> Any:
        if not self._root._children:  # noqa: SLF001
            return ()
        return super().iter_match(topic)


def skip_empty_callback_lookup(client: Any) -> bool:
    """paho splits every received topic and walks its filtered-callback tree even when it holds
    no callback (the transport routes messages itself); with none registered the lookup now
    returns at once, and one registered later is found as before. False when unknown."""
    current = getattr(client, "_on_message_filtered", None)
    if type(current) is not MQTTMatcher:
        _missing("_on_message_filtered")
        return False
    if current._root._children:  # noqa: SLF001 - already in use: leave it
        return False
    client._on_message_filtered = _FilteredCallbacks()  # noqa: SLF001
    return True


def opens_plain_socket(client: Any) -> bool:
    """True when paho's ``connect()`` would open a plain TCP socket itself (no TLS, no proxy, no
    websockets) through ``_create_socket``: then the transport may open that socket on its event
    loop and hand it over (:func:`connect_over`) instead of running the blocking connect in a
    thread. False when unknown (the transport then keeps the thread)."""
    reconnect = getattr(type(client), "reconnect", None)
    if reconnect is None or "_create_socket" not in getattr(reconnect, "__code__", reconnect).co_names:
        _missing("reconnect() through _create_socket")
        return False
    try:
        plain = client._transport == "tcp" and not client._ssl  # noqa: SLF001
        proxy = client._get_proxy()  # noqa: SLF001 - explicit or from the environment
    except AttributeError:
        _missing("_transport/_ssl/_get_proxy")
        return False
    return bool(plain) and not proxy


def connect_over(client: Any, sock: Any, connect: Callable[[], Any]) -> Any:
    """Call ``connect`` (paho's ``connect()``) with ``sock``, already connected, as the socket
    paho opens; only after :func:`opens_plain_socket` said True."""

    def handed_over() -> Any:
        del client._create_socket  # noqa: SLF001 - once: a later reconnect opens its own
        return sock

    client._create_socket = handed_over  # noqa: SLF001
    try:
        return connect()
    finally:
        client.__dict__.pop("_create_socket", None)


def set_max_inflight(client: Any, limit: int) -> None:
    """Set the in-flight window after CONNECT (paho's setter refuses once connected); 0 = none."""
    if hasattr(client, "_max_inflight_messages"):
        client._max_inflight_messages = limit  # noqa: SLF001
    else:
        _missing("_max_inflight_messages")


# ---------------------------------------------------------------- shared Properties tables

_TABLES = ("packetType", "types", "names", "properties")  # what the original __init__ sets
#: every packet type a Properties object is built for (WILLMESSAGE is paho's own extra type)
PROPERTY_PACKET_TYPES: tuple[int, ...] = (*range(PacketTypes.CONNECT, PacketTypes.AUTH + 1),
                                          PacketTypes.WILLMESSAGE)


def _original(fn: Any) -> Any:
    return getattr(fn, "__wrapped__", fn)


#: paho's own ``Properties.__init__`` and ``Properties.clear`` (kept for comparison and restoring)
original_properties_init: Callable[[Any, int], None] = _original(Properties.__init__)
original_properties_clear: Callable[[Any], None] = _original(Properties.clear)


def _original_tables(packet_type: int) -> dict[str, Any]:
    probe = Properties.__new__(Properties)
    original_properties_init(probe, packet_type)
    return dict(probe.__dict__)


def _shared_methods() -> tuple[Callable[[Any, int], None], Callable[[Any], None]] | None:
    """The fast __init__/clear pair, or None when this paho's Properties is not the known layout."""
    if not paho.mqtt.__version__.startswith("2."):
        return None
    try:
        first = _original_tables(PacketTypes.PUBLISH)
        if sorted(first) != sorted(_TABLES):
            return None
        types, names, properties = first["types"], first["names"], first["properties"]
        for packet_type in PROPERTY_PACKET_TYPES:
            fresh = _original_tables(packet_type)
            if fresh != {"packetType": packet_type, "types": types, "names": names,
                         "properties": properties}:
                return None
        compressed = frozenset(name.replace(" ", "") for name in names)
    except Exception:  # noqa: BLE001 - an unknown paho: leave it alone
        return None

    def __init__(self: Any, packetType: int) -> None:  # paho's signature
        d = self.__dict__
        d["packetType"] = packetType
        d["types"] = types
        d["names"] = names
        d["properties"] = properties

    def clear(self: Any) -> None:
        d = self.__dict__
        for name in [name for name in d if name in compressed]:
            del d[name]

    __init__.__wrapped__ = original_properties_init  # type: ignore[attr-defined]
    clear.__wrapped__ = original_properties_clear  # type: ignore[attr-defined]
    return __init__, clear


def properties_shared() -> bool:
    """True while paho's ``Properties`` uses the shared tables."""
    return getattr(Properties.__init__, "__wrapped__", None) is original_properties_init


def share_property_tables() -> bool:
    """Make paho's ``Properties`` share its constant tables (idempotent); False if left alone."""
    if properties_shared():
        return True
    methods = _shared_methods()
    if methods is None:
        _unknown_layout("Properties", "its per-packet tables are left as they are")
        return False
    Properties.__init__, Properties.clear = methods  # type: ignore[method-assign]
    return True


def restore_property_tables() -> None:
    """Put paho's own ``Properties.__init__`` and ``clear`` back."""
    Properties.__init__ = original_properties_init  # type: ignore[method-assign]
    Properties.clear = original_properties_clear  # type: ignore[method-assign]


# ---------------------------------------------------------------- one Condition for every MQTTMessageInfo

#: paho's own ``MQTTMessageInfo.__init__`` and ``_set_as_published``
original_info_init: Callable[[Any, int], None] = _original(paho_client.MQTTMessageInfo.__init__)
original_set_as_published: Callable[[Any], None] = _original(
    getattr(paho_client.MQTTMessageInfo, "_set_as_published"))  # noqa: B009 - a private member
_CONDITION = threading.Condition()   # shared: waiters loop on their own message's flag


def _shared_condition_methods() -> tuple[Callable[[Any, int], None], Callable[[Any], None]] | None:
    """The __init__/_set_as_published pair sharing one Condition, or None for an unknown layout."""
    info_cls = paho_client.MQTTMessageInfo
    if not paho.mqtt.__version__.startswith("2.") or set(getattr(info_cls, "__slots__", ())) != {
            "_condition", "_iterpos", "_published", "mid", "rc"}:
        return None
    try:
        probe = info_cls.__new__(info_cls)
        original_info_init(probe, 7)
        fields = {name: getattr(probe, name) for name in info_cls.__slots__}
        condition = fields.pop("_condition")
        if fields != {"mid": 7, "_published": False, "_iterpos": 0, "rc": 0} \
                or not isinstance(condition, type(_CONDITION)):
            return None
    except Exception:  # noqa: BLE001 - an unknown paho: leave it alone
        return None
    success = fields["rc"]

    def __init__(self: Any, mid: int) -> None:  # paho's signature
        self.mid = mid
        self._published = False
        self._condition = _CONDITION
        self.rc = success
        self._iterpos = 0

    def _set_as_published(self: Any) -> None:
        with self._condition:
            self._published = True
            self._condition.notify_all()   # every waiter checks its own message's flag again

    __init__.__wrapped__ = original_info_init  # type: ignore[attr-defined]
    _set_as_published.__wrapped__ = original_set_as_published  # type: ignore[attr-defined]
    return __init__, _set_as_published


def publish_conditions_shared() -> bool:
    """True while paho's ``MQTTMessageInfo`` objects share one Condition."""
    return getattr(paho_client.MQTTMessageInfo.__init__, "__wrapped__", None) is original_info_init


def share_publish_conditions() -> bool:
    """paho builds a ``threading.Condition`` (and its lock) for every message it sends and every
    one it receives (``MQTTMessage`` holds an ``MQTTMessageInfo``), for ``wait_for_publish()`` from
    another thread; at fleet scale that is a twentieth of a simulated device's CPU. One Condition
    serves them all: ``wait_for_publish()`` loops on its own message's flag, and publishing
    notifies every waiter, so each still wakes exactly when its own message is out. Idempotent;
    False (paho left alone, logged once) for an unknown paho."""
    if publish_conditions_shared():
        return True
    methods = _shared_condition_methods()
    if methods is None:
        _unknown_layout("MQTTMessageInfo", "a Condition per message is left as it is")
        return False
    init, set_as_published = methods
    paho_client.MQTTMessageInfo.__init__ = init  # type: ignore[method-assign, assignment]
    setattr(paho_client.MQTTMessageInfo, "_set_as_published", set_as_published)  # noqa: B010
    return True


def restore_publish_conditions() -> None:
    """Put paho's own ``MQTTMessageInfo.__init__`` and ``_set_as_published`` back."""
    paho_client.MQTTMessageInfo.__init__ = original_info_init  # type: ignore[method-assign, assignment]
    setattr(paho_client.MQTTMessageInfo, "_set_as_published", original_set_as_published)  # noqa: B010


__all__ = ["PROPERTY_PACKET_TYPES", "original_properties_clear", "original_properties_init",
           "properties_shared", "restore_property_tables", "share_property_tables", "socket_of", "forget_socket", "queued_packets", "in_callback", "packet_reader",
           "handle_read_error", "set_max_inflight", "keepalive_due",
           "publish_conditions_shared", "skip_empty_callback_lookup", "share_publish_conditions", "restore_publish_conditions"]
