"""The paho internals the transport leans on exist in the installed paho, and each has a fallback."""

from __future__ import annotations

import logging

import paho.mqtt.client as paho
import pytest

from sdk.messaging import paho_internals as pi


def test_installed_paho_has_every_internal_the_fast_path_uses(caplog: pytest.LogCaptureFixture) -> None:
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    with caplog.at_level(logging.WARNING, logger=pi.__name__):
        assert pi.queued_packets(client) == 0
        assert pi.in_callback(client) is False
        assert pi.packet_reader(client) is not None
        assert pi.socket_of(client) is None
        pi.set_max_inflight(client, 7)
    assert client._max_inflight_messages == 7  # noqa: SLF001
    assert not caplog.records  # no fallback was needed


def test_fallbacks_are_safe_when_paho_renames_its_internals(caplog: pytest.LogCaptureFixture) -> None:
    class Bare:
        reads = 0

        def loop_read(self) -> None:
            self.reads += 1

    bare = Bare()
    with caplog.at_level(logging.WARNING, logger=pi.__name__):
        assert pi.queued_packets(bare) == 2  # the batched (always correct) write path
        assert pi.in_callback(bare) is True  # defer writes rather than re-enter paho
        assert pi.packet_reader(bare) is None  # read with loop_read()
        pi.handle_read_error(bare, 1)
        pi.set_max_inflight(bare, 3)
        pi.forget_socket(bare, object())
    assert bare.reads == 1
    assert any("falls back" in r.getMessage() for r in caplog.records)
