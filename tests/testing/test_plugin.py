"""The autoglm pytest plugin, run the way an app team runs it: a test file of their own using
every fixture, in a pytest session of its own (``pytester``), on each broker kind."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from sdk.testing.brokers import mosquitto_installed

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "TESTING.md"

pytest_plugins = ["pytester"]
pytestmark = [pytest.mark.broker, pytest.mark.timeout(180)]

KINDS = [
    pytest.param("embedded", id="embedded"),
    pytest.param("mosquitto", id="mosquitto", marks=[
        pytest.mark.mosquitto, pytest.mark.skipif(not mosquitto_installed(), reason="mosquitto not installed")]),
]

INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
"""

APP_TESTS = '''
import asyncio

import pytest

from sdk.identity import Key, verify_credential
from sdk.inference import GenerationRequest
from sdk.messaging import SecureClient
from sdk.mesh import AccessPolicy, Mesh, MeshNode, NodeConfig, NodePolicy
from sdk.testing import until

RULES = [{
    "name": "companion", "event": "screen_available",
    "when": {"sender.kind": "display"},
    "target": {"select": "group", "group_prefix": "room:", "where": {"device.kind": "phone"}},
    "config": {"ui.layout": "companion", "ui.resolution": "{event.width}x{event.height}"},
}]
URLS = []


async def test_broker_url_kind_credentials_and_restart(autoglm_broker, pytestconfig):
    assert autoglm_broker.kind == (pytestconfig.getoption("--autoglm-broker") or "embedded")
    assert autoglm_broker.url.startswith("mqtt://127.0.0.1:")
    URLS.append(autoglm_broker.url)
    key = Key.generate()
    got = []
    async with SecureClient(autoglm_broker.url, key, **autoglm_broker.credentials(key)) as client:
        await client.subscribe("app/ping", lambda m: got.append(m.body), senders={key.did})
        await autoglm_broker.restart()
        await client.transport.wait_connected(10)
        await client.publish("app/ping", {"n": 1}, qos=1)
        await until(lambda: got == [{"n": 1}], 10, "the message after the restart")


async def test_zz_the_previous_broker_was_stopped():
    from sdk.messaging.errors import ConnectFailed
    from sdk.messaging.transport import MqttTransport
    from sdk.testing import TestBroker

    key = Key.generate()
    with pytest.raises(ConnectFailed):
        async with MqttTransport(URLS[0], connect_timeout=2, **TestBroker.credentials(key)):
            pass


def test_issuer_issues_every_type_it_trusts(autoglm_issuer):
    key = Key.generate()
    issued = {
        "DeviceCredential": autoglm_issuer.device(key, kind="phone", groups=["room:a"], capabilities=["ui"]),
        "CoordinatorCredential": autoglm_issuer.coordinator(key),
        "InferenceAccessCredential": autoglm_issuer.access(key, models=["m"], max_tokens=8),
        "InferenceNodeCredential": autoglm_issuer.node(key, models=["m"]),
        "OperatorCredential": autoglm_issuer.operator(key, roles=["read", "write"]),
    }
    lists = {autoglm_issuer.status_url: autoglm_issuer.status_list()}
    for kind, vc in issued.items():
        result = verify_credential(vc, trust=autoglm_issuer.trust_for(kind), status=lists)
        assert result.verified, (kind, result.errors)
        assert kind in vc["type"]
        assert not verify_credential(vc, trust=autoglm_issuer.trust_for("Other"), status=lists).verified


async def test_revoked_credentials_fail_verification(autoglm_issuer):
    key = Key.generate()
    kept, gone = autoglm_issuer.access(key), autoglm_issuer.access(Key.generate())
    assert await autoglm_issuer.revoke(gone, publish=False) == [1]
    lists = {autoglm_issuer.status_url: autoglm_issuer.status_list()}
    assert verify_credential(kept, trust=autoglm_issuer.trust, status=lists).verified
    result = verify_credential(gone, trust=autoglm_issuer.trust, status=lists)
    assert not result.verified and "revoked" in result.errors


async def test_coordinator_rule_reaches_the_right_device(autoglm_coordinator, autoglm_device, tmp_path):
    coordinator = await autoglm_coordinator(rules=RULES)
    assert coordinator.started and tmp_path in coordinator.data_dir.parents
    seen, other = [], []
    phone = await autoglm_device(kind="phone", groups=["room:a"], on_config=seen.append)
    await autoglm_device(kind="phone", groups=["room:b"], on_config=other.append)
    display = await autoglm_device(kind="display", groups=["room:a"])
    assert phone.admitted and display.admitted
    await display.screen_available(800, 600)
    info = await autoglm_coordinator.wait_for("converged")
    assert info["targets"] == 1
    assert [c.state["ui.resolution"] for c in seen] == ["800x600"] and other == []


async def test_a_device_without_a_coordinator_gets_one_and_revocation_reaches_it(
        autoglm_device, autoglm_coordinator, autoglm_issuer):
    phone = await autoglm_device(kind="phone")
    assert autoglm_coordinator.current is not None and phone.admitted
    await autoglm_issuer.revoke(phone.did)
    await autoglm_coordinator.wait_for("revoked", lambda i: i["did"] == phone.did)
    await until(lambda: not phone.admitted, 10, "the device told it is revoked")
    assert phone.state_reason == "revoked"


async def test_fake_engine_on_a_mesh_node_and_the_sniffer_sees_no_plaintext(
        autoglm_broker, autoglm_issuer, autoglm_fake_engine, autoglm_sniffer):
    await autoglm_issuer.publish()
    node_key, peer = Key.generate(), Key.generate()
    node = MeshNode(autoglm_fake_engine, autoglm_broker.url, key=node_key, access=AccessPolicy(autoglm_issuer.trust),
                    credential=autoglm_issuer.node(node_key), config=NodeConfig(advert_interval=1.0),
                    **autoglm_broker.credentials(node_key))
    router = Mesh(autoglm_broker.url, peer, credentials=[autoglm_issuer.access(peer)],
                  node_policy=NodePolicy(autoglm_issuer.trust), **autoglm_broker.credentials(peer))
    async with node, router:
        await router.wait_for_nodes(1, timeout=10)
        result = await router.generate(GenerationRequest(prompt="secret-prompt-xyzzy", max_new_tokens=64,
                                                         model="fake-model"))
    assert result.text == "Echo: secret-prompt-xyzzy" and result.usage.completion_tokens == len(result.text)
    assert autoglm_sniffer.on("autoglm/v1/inf/")                 # adverts, the request, the chunks
    assert not autoglm_sniffer.contains("xyzzy")


async def test_sniffer_sees_what_is_not_encrypted(autoglm_broker, autoglm_sniffer):
    key = Key.generate()
    async with SecureClient(autoglm_broker.url, key, **autoglm_broker.credentials(key)) as client:
        await client.publish("app/open", {"note": "plain-words-123"}, qos=1, retain=True)
        await client.publish("app/sealed", {"note": "sealed-words-456"}, qos=1, encrypt_to=key.did)
    msg = await autoglm_sniffer.wait_for_topic("app/sealed", timeout=10)
    assert msg.payload and not msg.retained
    assert autoglm_sniffer.contains("plain-words-123")            # signed, not sealed: readable
    assert not autoglm_sniffer.contains("sealed-words-456")
    assert "app/open" in autoglm_sniffer.topics()


async def test_the_issuer_publishes_its_status_list_on_the_tests_broker(autoglm_issuer, autoglm_sniffer):
    from sdk.messaging.status import status_list_topic

    await autoglm_issuer.publish()
    msg = await autoglm_sniffer.wait_for_topic(status_list_topic(autoglm_issuer.did))
    assert autoglm_issuer.status_url.encode() in msg.readable()


@pytest.mark.autoglm_broker("mosquitto")
async def test_the_marker_picks_mosquitto(autoglm_broker):
    assert autoglm_broker.kind == "mosquitto"


@pytest.mark.parametrize("autoglm_broker", ["embedded", "mosquitto"], indirect=True)
async def test_indirect_parameters_pick_the_kind(autoglm_broker, request):
    assert autoglm_broker.kind == request.node.callspec.params["autoglm_broker"]


async def test_waiting_for_nothing_fails(autoglm_sniffer):
    await autoglm_sniffer.wait_for_topic("never/published", timeout=0.3)


@pytest.mark.autoglm_broker("rabbitmq")
async def test_an_unknown_kind_is_a_usage_error(autoglm_broker):
    pass
'''


def _plugin_args(config: pytest.Config) -> list[str]:
    """``-p sdk.testing.plugin`` unless pytest already loads it from the installed entry point."""
    installed = any(ep.value == "sdk.testing.plugin" for ep in entry_points(group="pytest11"))
    return [] if installed or config.pluginmanager.has_plugin("autoglm") else ["-p", "sdk.testing.plugin"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_fixture_in_an_app_test_session(pytester: pytest.Pytester, request: pytest.FixtureRequest,
                                              kind: str) -> None:
    pytester.makeini(INI)
    pytester.makepyfile(test_app=APP_TESTS)
    result = pytester.runpytest(*_plugin_args(request.config), f"--autoglm-broker={kind}", "-p", "no:cacheprovider",
                                "-rA")
    outcomes = result.parseoutcomes()
    marker_skipped = 0 if mosquitto_installed() else 1
    assert outcomes.get("passed", 0) == 12 - 2 * marker_skipped, result.stdout.str()
    assert outcomes.get("failed") == 1 and outcomes.get("errors", outcomes.get("error")) == 1, result.stdout.str()
    result.stdout.fnmatch_lines(["*FAILED test_app.py::test_waiting_for_nothing_fails*"])
    result.stdout.fnmatch_lines(["*AssertionError: no matching message within 0.3s*"])
    result.stdout.fnmatch_lines(["*ERROR test_app.py::test_an_unknown_kind_is_a_usage_error*"])
    result.stdout.fnmatch_lines(["*broker kind must be one of ('embedded', 'mosquitto'), not 'rabbitmq'*"])


def test_strict_asyncio_mode(pytester: pytest.Pytester, request: pytest.FixtureRequest) -> None:
    pytester.makeini("[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_strict='''
import pytest
from sdk.inference import GenerationRequest

@pytest.mark.asyncio
async def test_engine_and_broker(autoglm_broker, autoglm_fake_engine):
    result = await autoglm_fake_engine.generate(GenerationRequest(prompt="x"))
    assert result.text == "Echo: x" and autoglm_broker.kind == "embedded"
''')
    result = pytester.runpytest(*_plugin_args(request.config), "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_the_fixtures_and_option_are_listed(pytester: pytest.Pytester, request: pytest.FixtureRequest) -> None:
    pytester.makeini(INI)
    fixtures = pytester.runpytest(*_plugin_args(request.config), "--fixtures", "-p", "no:cacheprovider")
    for name in ("autoglm_broker", "autoglm_issuer", "autoglm_coordinator", "autoglm_device",
                 "autoglm_fake_engine", "autoglm_sniffer"):
        fixtures.stdout.fnmatch_lines([f"{name}*"])
    helptext = pytester.runpytest(*_plugin_args(request.config), "--help")
    helptext.stdout.fnmatch_lines(["*--autoglm-broker*"])
    markers = pytester.runpytest(*_plugin_args(request.config), "--markers")
    markers.stdout.fnmatch_lines(["*autoglm_broker(kind)*"])


def _guide_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", GUIDE.read_text(encoding="utf-8"), re.S)


def test_the_guides_examples_run(pytester: pytest.Pytester, request: pytest.FixtureRequest) -> None:
    tests = [b for b in _guide_blocks() if "def test_" in b]
    assert len(tests) >= 5
    pytester.makeini(INI)
    pytester.makepyfile(**{f"test_guide_{i}": block for i, block in enumerate(tests)})
    result = pytester.runpytest(*_plugin_args(request.config), "-p", "no:cacheprovider")
    count = sum(len(re.findall(r"^async def test_", b, re.M)) for b in tests)
    skipped = 0 if mosquitto_installed() else 1
    result.assert_outcomes(passed=count - skipped, skipped=skipped)


def test_the_guides_example_without_pytest_runs() -> None:
    (script,) = [b for b in _guide_blocks() if "asyncio.run(main())" in b]
    out = subprocess.run([sys.executable, "-c", script], cwd=GUIDE.parent.parent, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def test_without_pytest_asyncio_only_the_async_fixtures_fail_with_the_extra_to_install(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text(
        "def test_broker(autoglm_broker):\n    pass\n\n"
        "def test_engine(autoglm_fake_engine):\n    assert autoglm_fake_engine.metadata['name'] == 'fake-model'\n")
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'pytest_asyncio':\n"
        "            raise ImportError('pytest-asyncio is not installed')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import pytest\n"
        "sys.exit(pytest.main(['-p', 'sdk.testing.plugin', '-p', 'no:cacheprovider', '-q', 'test_x.py']))\n"
    )
    root = str(GUIDE.parent.parent)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         check=False, env={"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": root,
                                           "PATH": "/usr/bin:/bin"})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 passed, 1 error" in out.stdout, out.stdout
    assert "autoglm_broker needs pytest-asyncio: pip install 'open-autoglm-sdk[testing]'" in out.stdout
