"""The Mosquitto config generator and runner (real mosquitto processes): the open test mode and
the secure default (TLS client certificates per DID, %u ACL, no anonymous access)."""

from __future__ import annotations

import asyncio
import datetime as dt
import tempfile
from pathlib import Path

import pytest
from cryptography import x509

from brokers.certs import CertificateAuthority, PKIFiles, client_identity, make_test_pki
from brokers.mosquitto import (
    MosquittoBroker,
    MosquittoConfig,
    find_mosquitto,
    render_config,
    secure_acl,
    wait_for_port,
)
from sdk.identity import Key, TrustPolicy
from sdk.messaging.broker_auth import did_credentials
from sdk.messaging.errors import ConnectFailed, PublishFailed
from sdk.messaging.topics import ROOT, client_token
from sdk.messaging.transport import Message, MqttTransport, TLSConfig
from tests.fixtures.brokers import SECURE_ADMIN

pytestmark = [
    pytest.mark.broker,
    pytest.mark.mosquitto,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not installed"),
]


def test_render_config_has_the_settings_the_sdk_relies_on(tmp_path: Path) -> None:
    text = render_config(
        MosquittoConfig.open_for_tests(persistence=True, max_queued_messages=5000, acl="topic read x"),
        port=1234, tls_port=None, workdir=tmp_path, pki=None, acl_file=tmp_path / "acl", password_file=None,
    )
    lines = set(text.splitlines())
    assert {"set_tcp_nodelay true", "max_queued_messages 5000", "persistence true",
            "listener 1234 127.0.0.1", f"acl_file {tmp_path / 'acl'}"} <= lines
    assert not any(line.startswith("cafile") for line in lines)


def test_persistence_saves_at_the_configured_interval(tmp_path: Path) -> None:
    def autosave(cfg: MosquittoConfig) -> list[str]:
        text = render_config(cfg, port=1234, tls_port=None, workdir=tmp_path, pki=None, acl_file=None,
                             password_file=None)
        return [line for line in text.splitlines() if line.startswith("autosave_interval")]

    # every save rewrites the whole database: not every second by default
    assert autosave(MosquittoConfig.open_for_tests(persistence=True)) == ["autosave_interval 60"]
    assert autosave(MosquittoConfig.open_for_tests(persistence=True, autosave_interval=0)) == ["autosave_interval 0"]
    assert autosave(MosquittoConfig.open_for_tests(autosave_interval=5)) == []      # no persistence
    for bad in (-1, 1.5, True, "60"):
        with pytest.raises(ValueError, match="autosave_interval"):
            MosquittoConfig.open_for_tests(persistence=True, autosave_interval=bad)  # type: ignore[arg-type]


async def test_a_short_autosave_keeps_retained_messages_across_a_crash() -> None:
    m = MosquittoBroker(MosquittoConfig.open_for_tests(persistence=True, autosave_interval=1))
    await asyncio.to_thread(m.start)
    try:
        async with MqttTransport(m.url) as pub:
            await pub.publish("fleet/kept", b"retained before the crash", qos=1, retain=True)
        db = m.workdir / "data" / "mosquitto.db"
        deadline = asyncio.get_running_loop().time() + 10
        while not db.exists():           # saved while running: no clean stop wrote it
            assert asyncio.get_running_loop().time() < deadline, "no autosave within 10 s"
            await asyncio.sleep(0.1)
        await asyncio.to_thread(m.kill)                    # SIGKILL: no save on the way down
        await asyncio.to_thread(m.start)
        got: asyncio.Queue[Message] = asyncio.Queue()
        async with MqttTransport(m.url) as sub:
            await sub.subscribe("fleet/#", qos=1, handler=lambda t, p, *, retain, qos:
                                got.put_nowait(Message(t, p, qos, retain)))
            msg = await asyncio.wait_for(got.get(), 5)
        assert (msg.topic, msg.payload, msg.retain) == ("fleet/kept", b"retained before the crash", True)
    finally:
        await asyncio.to_thread(m.cleanup)


def test_restart_keeps_the_port() -> None:
    with MosquittoBroker() as m:
        port = m.port
        m.restart()
        assert m.port == port and m.running and wait_for_port("127.0.0.1", port, 2)
    assert not m.running and not m.workdir.exists()


async def test_acl_and_password_file() -> None:
    config = MosquittoConfig.open_for_tests(
        allow_anonymous=False,
        passwords=(("alice", "pw-a"), ("bob", "pw-b")),
        acl="user alice\ntopic readwrite alice/#\n\nuser bob\ntopic read alice/#\n",
    )
    got: asyncio.Queue[Message] = asyncio.Queue()
    m = MosquittoBroker(config)
    await asyncio.to_thread(m.start)
    try:
        with pytest.raises(ConnectFailed) as info:
            await MqttTransport(m.url, username="alice", password="wrong").connect()
        assert info.value.reason in ("bad_credentials", "not_authorized")
        async with MqttTransport(m.url, username="alice", password="pw-a") as alice, \
                MqttTransport(m.url, username="bob", password="pw-b") as bob:
            await bob.subscribe("alice/#", qos=1, handler=lambda t, p, *, retain, qos:
                                got.put_nowait(Message(t, p, qos, retain)))
            # bob may only read: Mosquitto refuses his PUBLISH (MQTT 5 PUBACK reason 0x87)
            with pytest.raises(PublishFailed) as refused:
                await bob.publish("alice/x", b"from bob", qos=1)
            assert refused.value.reason == "not_authorized"
            await alice.publish("alice/x", b"hello", qos=1)
            assert (await asyncio.wait_for(got.get(), 5)).payload == b"hello"
            assert got.empty()
    finally:
        await asyncio.to_thread(m.cleanup)


async def test_tls_listener_can_require_client_certificates() -> None:
    m = MosquittoBroker(MosquittoConfig.open_for_tests(tls=True, require_certificate=True))
    await asyncio.to_thread(m.start)
    try:
        pki = m.pki
        assert pki is not None
        with pytest.raises(ConnectFailed):
            await MqttTransport(m.tls_url, tls=TLSConfig(ca_file=str(pki.ca)), connect_timeout=3).connect()
        tls = TLSConfig(ca_file=str(pki.ca), cert_file=str(pki.client.cert), key_file=str(pki.client.key))
        async with MqttTransport(m.tls_url, tls=tls) as t:
            assert t.connected and t.protocol == "5"
    finally:
        await asyncio.to_thread(m.cleanup)


# --------------------------------------------------------------------------- secure mode (the default)


def test_default_config_is_the_secure_mode(tmp_path: Path) -> None:
    cfg = MosquittoConfig()
    assert cfg.mode == "secure" and cfg.uses_tls and cfg.client_certificates and not cfg.anonymous
    pki = make_test_pki(tmp_path / "pki")
    text = render_config(cfg, port=1234, tls_port=None, workdir=tmp_path, pki=pki,
                         acl_file=tmp_path / "acl", password_file=None)
    lines = text.splitlines()
    assert {"allow_anonymous false", "listener 1234 127.0.0.1", "require_certificate true",
            "use_identity_as_username true", f"acl_file {tmp_path / 'acl'}", f"cafile {pki.ca}",
            "max_packet_size 1048576"} <= set(lines)
    assert [line for line in lines if line.startswith("listener")] == ["listener 1234 127.0.0.1"]  # TLS only
    with pytest.raises(ValueError):
        render_config(cfg, port=1234, tls_port=None, workdir=tmp_path, pki=None, acl_file=None,
                      password_file=None)
    for insecure in ({"allow_anonymous": True}, {"tls": False}, {"require_certificate": False},
                     {"passwords": (("u", "p"),)}):
        with pytest.raises(ValueError):
            MosquittoConfig(**insecure)  # type: ignore[arg-type]
    open_cfg = MosquittoConfig.open_for_tests()
    assert open_cfg.mode == "open" and open_cfg.anonymous and not open_cfg.uses_tls
    assert open_cfg.acl_text() is None


def test_secure_acl_patterns_follow_the_topic_layout() -> None:
    text = secure_acl((SECURE_ADMIN.did,))
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    first_user = next(i for i, line in enumerate(lines) if line.startswith("user "))
    # rules for every client are patterns (``topic`` lines before any ``user`` would apply to
    # anonymous clients only)
    assert all(line.startswith("pattern ") for line in lines[:first_user])
    assert f"pattern write {ROOT}/dev/%u/presence" in lines and f"pattern write {ROOT}/dev/%u/events" in lines
    assert f"pattern read {ROOT}/reply/%u" in lines and f"pattern write {ROOT}/reply/+" in lines
    assert not any("config" in line and "write" in line for line in lines[:first_user])
    admin = client_token(SECURE_ADMIN.did)
    assert lines[first_user:] == [f"user {admin}", f"topic write {ROOT}/dev/+/config",
                                  f"topic write {ROOT}/status/+", f"topic write {ROOT}/status/{admin}/presence"]
    assert f"pattern read {ROOT}/status/#" in lines     # the broadcast tree, one filter for a device


def test_client_certificate_issued_alongside_a_device_credential(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca")
    assert oct(ca.key_path.stat().st_mode & 0o777) == "0o600"  # type: ignore[union-attr]
    device = Key.generate()
    until = "2030-01-02T03:04:05Z"
    credential = {"type": ["VerifiableCredential", "DeviceCredential"], "validUntil": until,
                  "credentialSubject": {"id": device.did, "kind": "phone"}}
    files = ca.issue_for_credential(credential, tmp_path / "devices")
    assert client_identity(files.cert) == client_token(device.did)
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert cert.not_valid_after_utc == dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [device.did]
    with pytest.raises(ValueError):
        ca.issue_for_credential({"credentialSubject": {}}, tmp_path / "devices")


def _tls(m: MosquittoBroker, key: Key) -> TLSConfig:
    assert m.pki is not None
    files = m.issue_client_cert(key.did)
    return TLSConfig(ca_file=str(m.pki.ca), cert_file=str(files.cert), key_file=str(files.key))


async def test_secure_mode_keeps_each_did_to_its_own_topics(mosquitto_secure: MosquittoBroker) -> None:
    m = mosquitto_secure
    alice, bob, carol = Key.generate(), Key.generate(), Key.generate()
    a, b = client_token(alice.did), client_token(bob.did)
    events: asyncio.Queue[Message] = asyncio.Queue()
    # Alice claims Bob's DID as CONNECT username: the certificate decides who she is
    async with MqttTransport(m.url, tls=_tls(m, alice), **did_credentials(bob)) as ta, \
            MqttTransport(m.url, tls=_tls(m, bob)) as tb, \
            MqttTransport(m.url, tls=_tls(m, carol)) as tc, \
            MqttTransport(m.url, tls=_tls(m, SECURE_ADMIN)) as coord:
        assert ta.protocol == "5"
        await tb.subscribe(f"{ROOT}/dev/+/events", qos=1,
                           handler=lambda t, p, *, retain, qos: events.put_nowait(Message(t, p, qos, retain)))
        await ta.publish(f"{ROOT}/dev/{a}/events", b"alice event", qos=1)
        assert (await asyncio.wait_for(events.get(), 5)).payload == b"alice event"
        # Alice cannot speak for Bob: Mosquitto answers PUBACK 0x87 (not authorized)
        for topic in (f"{ROOT}/dev/{b}/events", f"{ROOT}/dev/{b}/presence", f"{ROOT}/dev/{b}/config"):
            with pytest.raises(PublishFailed) as refused:
                await ta.publish(topic, b"spoofed", qos=1, retain=True)
            assert refused.value.reason == "not_authorized"
        # anyone may write to an inbox; only the coordinator writes Bob's config
        await tc.publish(f"{ROOT}/dev/{a}/cmd", b"private to alice", qos=1, retain=True)
        await coord.publish(f"{ROOT}/dev/{b}/config", b"bob config", qos=1, retain=True)
        try:
            # a broad subscription is granted but delivers only what Bob may read
            seen: list[Message] = []
            arrived = asyncio.Event()

            def collect(t: str, p: bytes, *, retain: bool, qos: int) -> None:
                seen.append(Message(t, p, qos, retain))
                arrived.set()

            await tb.subscribe(f"{ROOT}/#", qos=1, handler=collect)
            await tb.subscribe(f"{ROOT}/dev/{b}/config", qos=1, handler=collect)

            def configs() -> list[Message]:
                return [x for x in seen if x.topic == f"{ROOT}/dev/{b}/config" and x.retain]

            # positive signal: the second SUBSCRIBE's retained copy of Bob's config, which
            # Mosquitto sends only after the first SUBSCRIBE's retained messages
            while len(configs()) < 2:
                arrived.clear()
                await asyncio.wait_for(arrived.wait(), 5)
            assert {x.payload for x in configs()} == {b"bob config"}
            assert [x.topic for x in seen if x.topic.endswith("/cmd")] == []
        finally:
            await tc.publish(f"{ROOT}/dev/{a}/cmd", b"", qos=1, retain=True)
            await coord.publish(f"{ROOT}/dev/{b}/config", b"", qos=1, retain=True)
        assert events.empty()


async def test_secure_mode_serves_the_broadcast_tree(mosquitto_secure: MosquittoBroker) -> None:
    """One ``status/#`` subscription brings a device the status lists and the coordinator's
    presence; only the coordinator (an admin) may publish a presence under ``status/``."""
    m = mosquitto_secure
    alice, bob = Key.generate(), Key.generate()
    a, admin = client_token(alice.did), client_token(SECURE_ADMIN.did)
    presence = f"{ROOT}/status/{admin}/presence"
    async with MqttTransport(m.url, tls=_tls(m, alice)) as ta, MqttTransport(m.url, tls=_tls(m, bob)) as tb, \
            MqttTransport(m.url, tls=_tls(m, SECURE_ADMIN)) as coord:
        with pytest.raises(PublishFailed) as refused:
            await ta.publish(f"{ROOT}/status/{a}/presence", b"alice poses as a coordinator", qos=1, retain=True)
        assert refused.value.reason == "not_authorized"
        await coord.publish(presence, b"coordinator online", qos=1, retain=True)
        await ta.publish(f"{ROOT}/status/{a}", b"alice's status list", qos=1, retain=True)
        try:
            got: dict[str, bytes] = {}
            both = asyncio.Event()
            wanted = {presence: b"coordinator online", f"{ROOT}/status/{a}": b"alice's status list"}

            def collect(t: str, p: bytes, *, retain: bool, qos: int) -> None:
                got[t] = p
                if wanted.keys() <= got.keys():
                    both.set()

            assert await tb.subscribe(f"{ROOT}/status/#", qos=1, handler=collect) == 1
            await asyncio.wait_for(both.wait(), 5)
            # (the broker is shared with other tests: their retained lists may come too)
            assert {t: got[t] for t in wanted} == wanted
            assert all(t.startswith(f"{ROOT}/status/") for t in got)
        finally:
            await coord.publish(presence, b"", qos=1, retain=True)
            await ta.publish(f"{ROOT}/status/{a}", b"", qos=1, retain=True)


async def test_secure_mode_refuses_clients_without_a_certificate_of_its_ca(
    mosquitto_secure: MosquittoBroker,
) -> None:
    m = mosquitto_secure
    assert m.url.startswith("mqtts://") and m.pki is not None
    other: PKIFiles = make_test_pki(Path(tempfile.mkdtemp(prefix="autoglm-other-ca-")))
    attempts = [
        {"target": m.url.replace("mqtts://", "mqtt://")},  # anonymous, plain TCP
        {"target": m.url, "tls": TLSConfig(ca_file=str(m.pki.ca))},  # TLS, no client certificate
        {"target": m.url, "tls": TLSConfig(ca_file=str(m.pki.ca), cert_file=str(other.client.cert),
                                           key_file=str(other.client.key))},  # another CA's certificate
    ]
    for attempt in attempts:
        target = str(attempt.pop("target"))
        with pytest.raises(ConnectFailed):
            await MqttTransport(target, connect_timeout=3, **attempt).connect()
    # the broker keeps serving certificate holders
    async with MqttTransport(m.url, tls=_tls(m, Key.generate())) as t:
        assert t.connected


async def test_the_coordination_flow_runs_on_the_secure_mode(tmp_path: Path) -> None:
    """Coordinator and devices, each with a certificate for its DID, on the secure default:
    admission (mutual authentication), event -> config, revocation all pass the %u ACL."""
    from sdk.coord.coordinator import Coordinator, load_rules
    from sdk.coord.device import REVOKED, Device
    from sdk.coord.events import screen_available

    issuer, ckey = Key.generate(), Key.generate()
    m = MosquittoBroker(MosquittoConfig(admins=(ckey.did,)))
    await asyncio.to_thread(m.start)
    devices: list[Device] = []
    coord: Coordinator | None = None
    try:
        assert m.pki is not None

        def url(key: Key) -> str:
            files = m.issue_client_cert(key.did)
            return f"{m.url}?ca={m.pki.ca}&cert={files.cert}&key={files.key}"  # type: ignore[union-attr]

        rules = load_rules(Path(__file__).resolve().parents[2] / "examples" / "rules.toml")
        coord = Coordinator(ckey, broker=url(ckey), data_dir=tmp_path, trust=TrustPolicy({}), issuer=issuer,
                            rules=rules)
        await coord.start()
        got: list[object] = []
        for kind in ("display", "phone"):
            key = Key.generate()
            cred = coord.issue_device_credential(key.did, kind=kind, groups=["room:living"])
            dev = Device(key, cred, broker=url(key), coordinator=ckey.did,
                         **({"on_config": got.append} if kind == "phone" else {}))
            await dev.connect()
            devices.append(dev)
        display, phone = devices
        await display.publish_event(screen_available(800, 600))
        await phone.wait_version(1, 10)
        assert got and got[0].state["ui.companion.resolution"] == "800x600"  # type: ignore[attr-defined]
        await coord.revoke(phone.did)
        for _ in range(250):
            if phone.state == REVOKED:
                break
            await asyncio.sleep(0.02)
        assert phone.state == REVOKED
    finally:
        for dev in devices:
            await dev.aclose()
        if coord is not None:
            await coord.stop()
        await asyncio.to_thread(m.cleanup)
