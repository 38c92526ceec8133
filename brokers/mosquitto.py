"""Run a real Mosquitto (2.0.x) on a free loopback port: config generator plus process runner.

``MosquittoBroker(MosquittoConfig(...))`` writes mosquitto.conf (TCP_NODELAY on, large queues,
optional persistence, TLS listener, ACL and password files) into a private directory, starts the
binary, waits until it accepts connections, and stops/restarts it on the same ports.

Two modes:

* ``MosquittoConfig()`` (``mode="secure"``, the default): one TLS listener that requires a client
  certificate, ``use_identity_as_username true`` (the certificate's CN, a DID token, is the
  username), no anonymous access, and the ACL of :func:`secure_acl` (``%u`` patterns: a client
  publishes only its own presence/events/ads/status list, reads only its own inboxes; only
  ``admins``, the coordinator, write device configs). Certificates come from a CA: pass your own
  (``cafile``/``certfile``/``keyfile``) or let the runner make one in its work directory, then
  ``broker.issue_client_cert(did)`` alongside each DeviceCredential.
* ``MosquittoConfig.open_for_tests()`` (``mode="open"``): plain TCP, anonymous clients allowed,
  no ACL unless given; the other fields (``tls``, ``passwords``, ``acl``...) apply as set.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from brokers.certs import CertFiles, CertificateAuthority, PKIFiles, make_test_pki
from sdk.messaging.topics import ROOT, client_token

log = logging.getLogger(__name__)

DEFAULT_BINARY = "/usr/sbin/mosquitto"


class BrokerStartError(RuntimeError):
    """The broker process exited or never accepted connections."""


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None if it is not installed."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return DEFAULT_BINARY if os.access(DEFAULT_BINARY, os.X_OK) else None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> bool:
    """Poll until a TCP connect to ``host:port`` succeeds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.02)
    return False


Mode = Literal["secure", "open"]
#: secure mode's default ``max_packet_size``: above the envelope limit (256 KiB by default)
SECURE_MAX_PACKET = 1024 * 1024


@dataclass(frozen=True)
class MosquittoConfig:
    """What the generated mosquitto.conf enables (secure by default; see the module docstring).

    ``None`` fields take the mode's default: secure = TLS, client certificate required, no
    anonymous clients, :func:`secure_acl`; open = plain TCP, anonymous clients, no ACL.
    """

    mode: Mode = "secure"
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port at first start, then keep it across restarts
    tls: bool | None = None  # open mode: add a TLS listener on ``tls_port`` (secure: the only listener)
    tls_port: int = 0
    require_certificate: bool | None = None
    persistence: bool = False
    #: with ``persistence``: seconds between saves of the whole in-memory database (sessions,
    #: subscriptions, retained messages); 0 saves only on a clean stop. Each save rewrites all of
    #: it (10,000 devices of the fleet bench: 8.9 MB), so a short interval is a cost that grows with
    #: the fleet, every interval; a crash loses what changed since the last save.
    autosave_interval: int = 60
    max_queued_messages: int = 100_000
    max_inflight_messages: int = 0  # 0 = no per-client limit
    max_packet_size: int | None = None  # None: secure 1 MiB (>= the envelope limit), open 0 (256 MiB)
    allow_anonymous: bool | None = None
    acl: str | None = None  # ACL file text (``user``/``topic``/``pattern`` lines); secure: secure_acl(admins)
    admins: tuple[str, ...] = ()  # secure ACL: DIDs (or tokens) that write configs and relay status lists
    passwords: tuple[tuple[str, str], ...] = ()  # (username, password) pairs → password_file (open mode)
    cafile: str | None = None  # server TLS material; None: the runner makes a CA in its work directory
    certfile: str | None = None
    keyfile: str | None = None
    extra: str = ""  # appended verbatim

    def __post_init__(self) -> None:
        if self.mode not in ("secure", "open"):
            raise ValueError(f"mode must be 'secure' or 'open', not {self.mode!r}")
        if self.mode == "secure":
            for name, insecure in (("tls", False), ("require_certificate", False), ("allow_anonymous", True)):
                if getattr(self, name) is insecure:
                    raise ValueError(f"{name}={insecure} needs MosquittoConfig(mode='open') "
                                     "(or MosquittoConfig.open_for_tests())")
            if self.passwords:
                raise ValueError("secure mode authenticates by client certificate; "
                                 "passwords need mode='open'")
        if isinstance(self.autosave_interval, bool) or not isinstance(self.autosave_interval, int) \
                or self.autosave_interval < 0:
            raise ValueError(f"autosave_interval must be a whole number of seconds >= 0, "
                             f"not {self.autosave_interval!r}")
        if (self.certfile is None) != (self.keyfile is None) or (self.certfile and not self.cafile):
            raise ValueError("give cafile, certfile and keyfile together")

    @classmethod
    def open_for_tests(cls, **overrides: Any) -> MosquittoConfig:
        """Plain TCP, anonymous clients, no ACL (unless ``overrides`` set them): tests and benches only."""
        return cls(mode="open", **overrides)

    @property
    def secure(self) -> bool:
        return self.mode == "secure"

    @property
    def uses_tls(self) -> bool:
        return self.secure or bool(self.tls)

    @property
    def anonymous(self) -> bool:
        return not self.secure if self.allow_anonymous is None else self.allow_anonymous

    @property
    def packet_limit(self) -> int:
        """``max_packet_size`` in bytes (0 = Mosquitto's default, 256 MiB)."""
        if self.max_packet_size is None:
            return SECURE_MAX_PACKET if self.secure else 0
        return self.max_packet_size

    @property
    def client_certificates(self) -> bool:
        return self.secure or bool(self.require_certificate)

    def acl_text(self) -> str | None:
        """The ACL file the broker gets: ``acl`` if set, else the secure default (secure mode only)."""
        if self.acl is not None:
            return self.acl
        return secure_acl(self.admins) if self.secure else None


def secure_acl(admins: Sequence[str] = ()) -> str:
    """Mosquitto ACL for usernames that are DID tokens (the topic layout of docs/PROTOCOL.md).

    Every client: publish its own ``dev/%u/presence``, ``dev/%u/events``, ``inf/ads/%u`` and
    ``status/%u``; publish to anyone's inbox (``dev/+/cmd``, ``inf/req/+``, ``reply/+``); read its
    own inboxes (``dev/%u/cmd``, ``dev/%u/config``, ``inf/req/%u``, ``reply/%u``) and the public
    state (presence, events, configs, adverts, and the broadcast tree ``status/#``: status lists
    and coordinators' presence). ``admins`` (the coordinator, DIDs or tokens) also write every
    device's config, relay status lists and publish their own presence (and will) under
    ``status/{token}/presence``. Nothing else.
    """
    r = ROOT
    lines = [
        "# generated by brokers.mosquitto.secure_acl: %u is the DID token (certificate CN)",
        f"pattern write {r}/dev/%u/presence",
        f"pattern write {r}/dev/%u/events",
        f"pattern write {r}/inf/ads/%u",
        f"pattern write {r}/status/%u",
        f"pattern read {r}/dev/%u/cmd",
        f"pattern read {r}/dev/%u/config",
        f"pattern read {r}/inf/req/%u",
        f"pattern read {r}/reply/%u",
        f"pattern write {r}/dev/+/cmd",
        f"pattern write {r}/inf/req/+",
        f"pattern write {r}/reply/+",
        f"pattern read {r}/dev/+/presence",
        f"pattern read {r}/dev/+/events",
        f"pattern read {r}/dev/+/config",
        f"pattern read {r}/inf/ads/+",
        f"pattern read {r}/status/+",
        f"pattern read {r}/status/#",
    ]
    for admin in dict.fromkeys(client_token(a) for a in admins):
        lines += ["", f"user {admin}", f"topic write {r}/dev/+/config", f"topic write {r}/status/+",
                  f"topic write {r}/status/{admin}/presence"]
    return "\n".join(lines) + "\n"


def render_config(
    cfg: MosquittoConfig,
    *,
    port: int,
    tls_port: int | None,
    workdir: Path,
    pki: PKIFiles | None,
    acl_file: Path | None,
    password_file: Path | None,
) -> str:
    """The mosquitto.conf text for ``cfg`` (pure function: easy to inspect and document).

    Secure mode: the one listener on ``port`` is TLS (``pki`` required); open mode: plain TCP on
    ``port`` plus TLS on ``tls_port`` if given.
    """
    if cfg.secure and (pki is None or acl_file is None):
        raise ValueError("secure mode needs TLS material (pki) and an ACL file")
    lines = [
        "# generated by brokers.mosquitto" + (" (secure mode)" if cfg.secure else " (open mode: tests only)"),
        "per_listener_settings false",
        f"allow_anonymous {'true' if cfg.anonymous else 'false'}",
        "set_tcp_nodelay true",
        f"max_queued_messages {cfg.max_queued_messages}",
        f"max_inflight_messages {cfg.max_inflight_messages}",
        "max_queued_bytes 0",
        f"log_dest file {workdir / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "connection_messages true",
    ]
    if os.geteuid() == 0:
        lines.append("user mosquitto" if _has_user("mosquitto") else "user root")
    if cfg.packet_limit:
        lines.append(f"max_packet_size {cfg.packet_limit}")
    if cfg.persistence:
        lines += ["persistence true", f"persistence_location {workdir / 'data'}/",
                  f"autosave_interval {cfg.autosave_interval}"]
    if acl_file is not None:
        lines.append(f"acl_file {acl_file}")
    if password_file is not None:
        lines.append(f"password_file {password_file}")

    def tls_lines(p: PKIFiles) -> list[str]:
        out = [f"cafile {p.ca}", f"certfile {p.server.cert}", f"keyfile {p.server.key}",
               f"require_certificate {'true' if cfg.client_certificates else 'false'}"]
        if cfg.secure:
            out.append("use_identity_as_username true")
        return out

    if cfg.secure:
        assert pki is not None
        lines += ["", f"listener {port} {cfg.host}", *tls_lines(pki)]
    else:
        lines += ["", f"listener {port} {cfg.host}"]
        if tls_port is not None and pki is not None:
            lines += ["", f"listener {tls_port} {cfg.host}", *tls_lines(pki)]
    if cfg.extra:
        lines += ["", cfg.extra]
    return "\n".join(lines) + "\n"


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


class MosquittoBroker:
    """A mosquitto process on loopback; ``start()``/``stop()``/``restart()`` keep the ports."""

    def __init__(
        self,
        config: MosquittoConfig | None = None,
        /,
        *,
        workdir: str | Path | None = None,
        binary: str | None = None,
    ) -> None:
        self.config = config or MosquittoConfig()
        binary = binary or find_mosquitto()
        if binary is None:
            raise BrokerStartError("mosquitto binary not found (apt-get install mosquitto)")
        self.binary = binary
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="autoglm-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.config.port or free_port(self.config.host)
        self.tls_port: int | None = None
        self.pki: PKIFiles | None = None
        #: issues client certificates (``issue_client_cert``) when the broker made its own CA
        self.ca: CertificateAuthority | None = None
        cfg = self.config
        if cfg.cafile is not None and cfg.certfile is not None and cfg.keyfile is not None:
            self.pki = PKIFiles(ca=Path(cfg.cafile), server=CertFiles(Path(cfg.certfile), Path(cfg.keyfile)),
                                client=CertFiles(Path(cfg.certfile), Path(cfg.keyfile)))
        elif cfg.uses_tls:
            self.pki = make_test_pki(self.workdir / "pki", hosts=(cfg.host, "localhost"))
            assert self.pki.ca_key is not None
            self.pki.ca_key.chmod(0o600)
            self.ca = CertificateAuthority.load(self.pki.ca, self.pki.ca_key)
        if cfg.secure:
            self.tls_port = self.port
        elif cfg.tls:
            self.tls_port = cfg.tls_port or free_port(cfg.host)
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_files()

    # -- files
    def _write_files(self) -> None:
        d = self.workdir
        d.chmod(0o755)
        acl_file = pw_file = None
        acl_text = self.config.acl_text()
        if acl_text is not None:
            acl_file = d / "acl"
            acl_file.write_text(acl_text)
        if self.config.passwords:
            pw_file = d / "passwd"
            pw_file.write_text("")
            for user, password in self.config.passwords:
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(pw_file), user, password],
                    check=True, capture_output=True,
                )
        if self.config.persistence:
            (d / "data").mkdir(exist_ok=True)
        self.conf_file = d / "mosquitto.conf"
        self.conf_file.write_text(
            render_config(
                self.config, port=self.port, tls_port=self.tls_port, workdir=d, pki=self.pki,
                acl_file=acl_file, password_file=pw_file,
            )
        )
        # When started as root, mosquitto drops to user `mosquitto` before reading key, ACL and
        # persistence files: make them reachable for it.
        if os.geteuid() == 0 and _has_user("mosquitto"):
            uid = pwd.getpwnam("mosquitto").pw_uid
            gid = pwd.getpwnam("mosquitto").pw_gid
            for p in [d, *d.rglob("*")]:
                with contextlib.suppress(OSError):
                    os.chown(p, uid, gid)
        for p in d.rglob("*"):
            if self.pki is not None and p == self.pki.ca_key:
                continue  # mosquitto never needs the CA key
            with contextlib.suppress(OSError):
                p.chmod(0o755 if p.is_dir() else 0o644)

    # -- client certificates
    def issue_client_cert(self, did: str, directory: str | Path | None = None, *, days: int = 2) -> CertFiles:
        """A client certificate for ``did`` (CN = its DID token) from this broker's own CA."""
        if self.ca is None:
            raise RuntimeError("this broker has no CA of its own (TLS off, or cafile given without its key): "
                               "issue certificates with brokers.certs.CertificateAuthority")
        return self.ca.issue_for_did(did, directory or self.workdir / "clients", days=days)

    # -- URLs
    @property
    def url(self) -> str:
        """Where clients connect: ``mqtts://`` in secure mode, the plain listener in open mode."""
        scheme = "mqtts" if self.config.secure else "mqtt"
        return f"{scheme}://{self.config.host}:{self.port}"

    @property
    def tls_url(self) -> str:
        if self.tls_port is None:
            raise RuntimeError("this broker has no TLS listener (MosquittoConfig(tls=True))")
        return f"mqtts://{self.config.host}:{self.tls_port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- process
    def start(self, timeout: float = 10.0) -> None:
        """Start the process and wait until every listener accepts connections."""
        if self.running:
            return
        self._proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf_file)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        ports = list(dict.fromkeys([self.port] + ([self.tls_port] if self.tls_port else [])))
        deadline = time.monotonic() + timeout
        for port in ports:
            while not wait_for_port(self.config.host, port, 0.2):
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                    self.stop()
                    raise BrokerStartError(
                        f"mosquitto did not start on port {port}: {err.strip()} {self.log_text()[-2000:]}"
                    )
        log.debug("mosquitto pid %s listening on %s", self._proc.pid, ports)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (mosquitto saves its persistence DB), then SIGKILL if it hangs."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stderr:
            proc.stderr.close()

    def kill(self) -> None:
        """SIGKILL: an abrupt crash (no persistence save)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc is not None and proc.stderr:
            proc.stderr.close()

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same ports (sessions survive if ``persistence``)."""
        self.stop()
        self.start(timeout)

    def cleanup(self) -> None:
        """Stop and delete the working directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


__all__ = [
    "MosquittoBroker",
    "MosquittoConfig",
    "BrokerStartError",
    "find_mosquitto",
    "free_port",
    "wait_for_port",
    "render_config",
    "secure_acl",
]
