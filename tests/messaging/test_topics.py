"""Topic layout builders: ids never inject wildcards or levels."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sdk.coord import protocol
from sdk.identity import Key
from sdk.mesh import topics as mesh_topics
from sdk.messaging import topics

BUILDERS = [
    protocol.device_presence,
    protocol.device_events,
    protocol.device_config,
    protocol.device_commands,
    mesh_topics.inference_requests,
    mesh_topics.inference_ad,
    topics.reply_topic,
]


def test_layout() -> None:
    assert protocol.device_presence("tv-1") == "autoglm/v1/dev/tv-1/presence"
    assert protocol.device_events("tv-1") == "autoglm/v1/dev/tv-1/events"
    assert protocol.device_config("tv-1") == "autoglm/v1/dev/tv-1/config"
    assert protocol.device_commands("tv-1") == "autoglm/v1/dev/tv-1/cmd"
    assert mesh_topics.inference_requests("gpu0") == "autoglm/v1/inf/req/gpu0"
    assert mesh_topics.inference_ad("gpu0") == "autoglm/v1/inf/ads/gpu0"
    assert topics.reply_topic("c1") == "autoglm/v1/reply/c1"
    assert protocol.parse_device_topic("autoglm/v1/dev/tv-1/events") == ("tv-1", "events")
    assert protocol.parse_device_topic("autoglm/v1/inf/req/x") is None


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("bad", ["", "+", "#", "a/b", "a+", "x#", "nul\x00", "tab\t", "sp ace", "$SYS", "x" * 129])
def test_builders_reject_injection(builder, bad: str) -> None:
    with pytest.raises(ValueError):
        builder(bad)


def test_builders_reject_non_str() -> None:
    with pytest.raises(TypeError):
        protocol.device_events(5)  # type: ignore[arg-type]


@given(st.text(min_size=1, max_size=40))
def test_any_accepted_id_is_exactly_one_level(ident: str) -> None:
    try:
        topic = protocol.device_events(ident)
    except ValueError:
        return
    assert topic.split("/") == ["autoglm", "v1", "dev", ident, "events"]
    assert "+" not in topic and "#" not in topic
    assert topics.matches(protocol.ALL_EVENTS, topic)


def test_client_token_from_did() -> None:
    key = Key.generate()
    token = topics.client_token(key.did)
    assert key.did.endswith(token) and topics.reply_topic(token).count("/") == 3


@pytest.mark.parametrize(
    ("flt", "topic", "ok"),
    [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("a/b", "a/b/c", False),
        ("a/+", "a", False),
    ],
)
def test_matches(flt: str, topic: str, ok: bool) -> None:
    assert topics.matches(flt, topic) is ok


@pytest.mark.parametrize("bad", ["a/#/b", "a/b#", "a/+b", "", "x\x00"])
def test_validate_filter(bad: str) -> None:
    with pytest.raises(ValueError):
        topics.validate_filter(bad)


@pytest.mark.parametrize("bad", ["a/+", "#", "", "a\x00"])
def test_validate_topic(bad: str) -> None:
    with pytest.raises(ValueError):
        topics.validate_topic(bad)
