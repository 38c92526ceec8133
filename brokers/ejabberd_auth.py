"""DID CONNECT proofs for ejabberd's MQTT listener: an external-authentication program and its verifier.

ejabberd (``auth_method: [external]``) starts ``extauth_program`` and writes one request per
CONNECT on its stdin: a 2-byte big-endian length, then ``auth:USER:HOST:PASSWORD``; the answer is
a 2-byte length (always 2) and a 2-byte result, 1 = admit, 0 = refuse. Other commands
(``isuser``, ``setpass``, ``tryregister``, ``removeuser``...) are answered 0.

Two halves, so the program ejabberd starts needs nothing but the standard library (it runs as
the ``ejabberd`` user, which may not be able to read the SDK's Python environment):

* :class:`ProofVerifier` / :class:`AuthServer` (SDK side): checks the proof with
  :func:`sdk.messaging.broker_auth.verify_connect_password` (signature, audience, freshness,
  replay) and serves the extauth frames on a Unix socket. One server serves every node on its
  machine, so its :class:`~sdk.messaging.broker_auth.ProofReplayGuard` is shared by them: a
  proof admitted by node 1 is refused by node 2.
* ``relay`` (``python3 ejabberd_auth.py relay SOCKET``): the extauth program; pipes each frame to
  the server and its answer back, and answers 0 (refuse) when the server cannot be reached.

Username scheme: ejabberd nodepreps (lowercases) the MQTT username and refuses ``:`` in it, so a
client logs in with the lowercased method-specific id of its ``did:key`` (``z6mk...``, see
:func:`ejabberd_username`); the DID is taken from the signed proof in the password, and the proof
is admitted only if that DID lowercases to the username. The extauth protocol carries no MQTT
client id, so the proof's ``cid`` cannot be compared with the CONNECT's client id here; a proof is
single-use (shared replay guard) and valid for ``window`` seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, BinaryIO

log = logging.getLogger("brokers.ejabberd_auth")

MAX_FRAME = 4096


def ejabberd_username(did: str) -> str:
    """The MQTT username of ``did`` on ejabberd: its method-specific id, lowercased."""
    return did.partition("#")[0].rsplit(":", 1)[-1].lower()


def read_frame(stream: BinaryIO) -> bytes | None:
    """One length-prefixed extauth frame, or None at end of stream."""
    head = _read_exact(stream, 2)
    if head is None:
        return None
    (size,) = struct.unpack(">H", head)
    return _read_exact(stream, size) if size else b""


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def answer(ok: bool) -> bytes:
    """The extauth answer frame."""
    return struct.pack(">HH", 2, 1 if ok else 0)


class ProofVerifier:
    """Decides ``auth:USER:HOST:PASSWORD`` requests with the SDK's CONNECT-proof rules."""

    def __init__(self, *, window: float = 60.0, max_recent_proofs: int = 100_000,
                 max_proofs_per_identity: int = 1_000, audience: str | None = None) -> None:
        from sdk.messaging.broker_auth import AUDIENCE, ProofReplayGuard

        self.window = window
        self.audience = audience or AUDIENCE
        self.replay = ProofReplayGuard(window=window, max_entries=max_recent_proofs,
                                       max_per_identity=max_proofs_per_identity)
        self._lock = threading.RLock()
        #: ``(username, reason)`` of recent refusals, newest last (operators and tests read it).
        self.rejections: list[tuple[str, str]] = []
        #: DIDs admitted, newest last.
        self.admitted: list[str] = []

    def handle(self, frame: bytes) -> bool:
        """True to admit; every refusal is logged with its reason."""
        from sdk.identity.hazmat import json as strict_json
        from sdk.identity.hazmat.jws import split_compact
        from sdk.messaging.broker_auth import MAX_PROOF_LEN, verify_connect_password
        from sdk.messaging.errors import BrokerAuthError

        try:
            text = frame.decode("utf-8")
        except UnicodeDecodeError:
            return self._refuse("?", "malformed_request", "request is not UTF-8")
        command, _, rest = text.partition(":")
        if command != "auth":
            return False  # isuser, setpass, tryregister, removeuser...: no accounts here
        user, _, rest = rest.partition(":")
        _host, _, password = rest.partition(":")
        if not user or not password:
            return self._refuse(user or "?", "malformed_proof", "username and proof password required")
        try:  # the DID travels in the signed proof; the username is only its lowercased form
            payload = strict_json.loads(split_compact(password, max_len=MAX_PROOF_LEN).payload,
                                        max_bytes=MAX_PROOF_LEN, max_depth=4)
        except ValueError as exc:
            return self._refuse(user, "malformed_proof", f"proof does not decode: {exc}")
        did = payload.get("iss") if isinstance(payload, dict) else None
        if not isinstance(did, str) or not did.startswith("did:key:"):
            return self._refuse(user, "malformed_proof", "proof names no did:key issuer")
        if ejabberd_username(did) != user:
            return self._refuse(user, "wrong_username", "proof DID does not lowercase to the username")
        cid = payload.get("cid")
        with self._lock:
            try:
                verify_connect_password(did, password, cid if isinstance(cid, str) else "",
                                        window=self.window, replay=self.replay, audience=self.audience)
            except BrokerAuthError as exc:
                return self._refuse(user, exc.reason, str(exc))
            self.admitted.append(did)
            del self.admitted[:-1000]
        log.debug("admitted %s", did)
        return True

    def _refuse(self, user: str, reason: str, detail: str) -> bool:
        log.warning("refused MQTT CONNECT for %r (%s): %s", user[:64], reason, detail)
        with self._lock:
            self.rejections.append((user, reason))
            del self.rejections[:-1000]
        return False


class _Handler(socketserver.StreamRequestHandler):
    server: _UnixServer

    def handle(self) -> None:
        while True:
            try:
                frame = read_frame(self.rfile)  # type: ignore[arg-type]
            except OSError:
                return
            if frame is None:
                return
            try:
                ok = self.server.verifier.handle(frame)
            except Exception:  # the verifier must answer every frame, whatever it holds
                log.exception("extauth request failed")
                ok = False
            try:
                self.wfile.write(answer(ok))
                self.wfile.flush()
            except OSError:
                return


class _UnixServer(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    verifier: ProofVerifier


class AuthServer:
    """Serves extauth frames on a Unix socket (readable by the ejabberd user) in a thread."""

    def __init__(self, path: str, verifier: ProofVerifier | None = None) -> None:
        self.path = path
        self.verifier = verifier or ProofVerifier()
        self._server: _UnixServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        server = _UnixServer(self.path, _Handler)
        server.verifier = self.verifier
        os.chmod(self.path, 0o666)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ejabberd-auth", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if os.path.exists(self.path):
            os.unlink(self.path)


def relay(socket_path: str, stdin: BinaryIO, stdout: BinaryIO,
          connect: Callable[[str], Any] | None = None) -> None:
    """The extauth program: each frame from ejabberd goes to the server; no server means refuse."""
    conn: Any = None
    while True:
        frame = read_frame(stdin)
        if frame is None:
            return
        ok = False
        for _ in range(2):  # one reconnect: the server may have restarted since the last frame
            try:
                if conn is None:
                    conn = (connect or _connect_unix)(socket_path)
                conn.sendall(struct.pack(">H", len(frame)) + frame)
                reply = _read_exact(conn.makefile("rb", buffering=0), 4)
                if reply is None:
                    raise OSError("verifier closed the connection")
                ok = struct.unpack(">HH", reply)[1] == 1
                break
            except OSError as exc:
                sys.stderr.write(f"ejabberd_auth relay: verifier at {socket_path} unreachable: {exc}\n")
                if conn is not None:
                    conn.close()
                conn = None
        stdout.write(answer(ok))
        stdout.flush()


def _connect_unix(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10.0)
    s.connect(path)
    return s


def main(argv: list[str] | None = None) -> int:
    """``relay SOCKET`` (the extauth program) or ``serve SOCKET [WINDOW]`` (the verifier)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 2 and args[0] == "relay":
        relay(args[1], sys.stdin.buffer, sys.stdout.buffer)
        return 0
    if len(args) >= 2 and args[0] == "serve":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        server = AuthServer(args[1], ProofVerifier(window=float(args[2]) if len(args) > 2 else 60.0))
        server.start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            server.stop()
        return 0
    sys.stderr.write("usage: ejabberd_auth.py relay SOCKET | serve SOCKET [WINDOW]\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
