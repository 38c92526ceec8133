"""The ejabberd extauth half without ejabberd: framing, the verifier's rules, the relay program."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from brokers.ejabberd_auth import AuthServer, ProofVerifier, answer, ejabberd_username, read_frame
from sdk.identity import Key
from sdk.messaging.broker_auth import make_connect_password

RELAY = Path(__file__).resolve().parents[2] / "brokers" / "ejabberd_auth.py"


def frame(text: str) -> bytes:
    data = text.encode()
    return struct.pack(">H", len(data)) + data


def auth(key: Key, client_id: str = "c1", *, user: str | None = None, now: float | None = None) -> bytes:
    password = make_connect_password(key, client_id, now=now)
    return f"auth:{user if user is not None else ejabberd_username(key.did)}:localhost:{password}".encode()


def test_username_is_the_lowercased_method_specific_id() -> None:
    key = Key.generate()
    name = ejabberd_username(key.did)
    assert ":" not in name and name == key.did.rsplit(":", 1)[-1].lower()
    assert ejabberd_username(key.verification_method) == name


def test_framing_round_trip_and_end_of_stream() -> None:
    stream = io.BytesIO(frame("auth:a:b:c") + frame(""))
    assert read_frame(stream) == b"auth:a:b:c"
    assert read_frame(stream) == b""
    assert read_frame(stream) is None
    assert read_frame(io.BytesIO(b"\x00\x05ab")) is None  # truncated frame
    assert answer(True) == b"\x00\x02\x00\x01" and answer(False) == b"\x00\x02\x00\x00"


def test_verifier_admits_a_fresh_proof_once_and_names_each_refusal() -> None:
    v = ProofVerifier(window=60)
    key, other = Key.generate(), Key.generate()
    request = auth(key)
    assert v.handle(request) is True
    assert v.handle(request) is False  # the same proof again
    cases = [
        (auth(key, user=ejabberd_username(other.did)), "wrong_username"),
        (auth(key, now=1_000_000.0), "stale_proof"),
        (f"auth:{ejabberd_username(key.did)}:localhost:not-a-jws".encode(), "malformed_proof"),
        (f"auth:{ejabberd_username(key.did)}:localhost:".encode(), "malformed_proof"),
        (b"\xff\xfe", "malformed_request"),
    ]
    for req, _ in cases:
        assert v.handle(req) is False
    assert [r for _, r in v.rejections] == ["replayed_proof"] + [r for _, r in cases]
    assert v.handle(f"isuser:{ejabberd_username(key.did)}:localhost".encode()) is False
    assert v.admitted == [key.did]


def test_relay_program_forwards_to_the_server_and_refuses_without_it() -> None:
    key = Key.generate()
    with tempfile.TemporaryDirectory() as tmp:
        sock = str(Path(tmp) / "auth.sock")
        server = AuthServer(sock)
        server.start()
        try:
            stdin = frame(auth(key).decode()) + frame(auth(key, "c2", user="someone-else").decode())
            out = subprocess.run([sys.executable, str(RELAY), "relay", sock], input=stdin,
                                 capture_output=True, timeout=30, check=True).stdout
            assert out == answer(True) + answer(False)
        finally:
            server.stop()
        # no server: refuse (and say why on stderr), never admit
        res = subprocess.run([sys.executable, str(RELAY), "relay", sock], input=frame(auth(key, "c3").decode()),
                             capture_output=True, timeout=30, check=True)
        assert res.stdout == answer(False) and b"unreachable" in res.stderr


@pytest.mark.parametrize("argv", [[], ["bogus"], ["relay"]])
def test_relay_usage_errors(argv: list[str]) -> None:
    res = subprocess.run([sys.executable, str(RELAY), *argv], capture_output=True, timeout=30)
    assert res.returncode == 2 and b"usage" in res.stderr
