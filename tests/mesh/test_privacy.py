"""The broker is untrusted: a raw subscriber to ``#`` never sees prompt or completion plaintext."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from sdk.identity import Key
from sdk.inference import GenerationRequest
from tests.mesh.conftest import MeshEnv

pytestmark = [pytest.mark.model, pytest.mark.broker, pytest.mark.slow]

SECRET_PROMPT = "My secret passphrase is tangerine-walrus-42. Repeat it:"


class Sniffer:
    """A plain paho client subscribed to ``#`` that records every payload the broker relays."""

    def __init__(self, url: str, credentials: dict[str, Any]) -> None:
        parts = urlsplit(url)
        self.payloads: list[bytes] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="sniffer", protocol=paho.MQTTv311)
        password = credentials.get("password")
        if callable(password):
            password = password("sniffer")
        self.client.username_pw_set(credentials.get("username"), password)
        self.client.on_connect = lambda c, *a: c.subscribe("#", qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(parts.hostname or "127.0.0.1", parts.port or 1883)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._lock:
            self.payloads.append(bytes(msg.payload))

    def wait(self) -> None:
        assert self._subscribed.wait(10), "sniffer did not subscribe"

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def readable(self) -> str:
        """Every payload as the broker could read it: raw, and each base64url segment decoded."""
        out = []
        with self._lock:
            payloads = list(self.payloads)
        for p in payloads:
            out.append(p.decode("utf-8", "replace"))
            for part in p.split(b"."):
                try:
                    out.append(base64.urlsafe_b64decode(part + b"=" * (-len(part) % 4)).decode("utf-8", "replace"))
                except ValueError:
                    pass
        return "\n".join(out)


async def test_broker_never_sees_prompt_or_completion(mesh_env: MeshEnv, peer_key: Key, access_vc: Any) -> None:
    sniffer = Sniffer(mesh_env.url, mesh_env.credentials(Key.generate()))
    try:
        await asyncio.to_thread(sniffer.wait)
        await mesh_env.node(0)
        mesh = await mesh_env.router(peer_key, [access_vc])
        result = await mesh.generate(GenerationRequest(prompt=SECRET_PROMPT, max_new_tokens=12, temperature=0.0))
        await asyncio.sleep(0.3)  # let the last chunks reach the sniffer
    finally:
        sniffer.close()
    seen = sniffer.readable()
    assert "inference.generate" in seen and "stream.chunk" in seen  # it did see the (signed) traffic
    assert "tangerine" not in seen and "passphrase" not in seen
    completion = result.text.strip()
    assert len(completion) >= 4
    for needle in {completion, json.dumps(completion)[1:-1]}:
        assert needle not in seen
