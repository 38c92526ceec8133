"""A plain TCP socket with user-space read and write buffers, for paho to read from and write to.

paho reads a packet in three or more ``recv`` calls (the command byte, each byte of the remaining
length, then the rest) and writes each queued packet with a ``send`` of its own. On a busy
connection that is a system call per few bytes: a device receiving a config and the
acknowledgement of its report made nine ``recvfrom`` calls, and its acknowledgement and report
left in two ``sendto`` plus the two ``setsockopt`` calls that corked them into one segment.

:class:`BufferedSocket` reads what the kernel has (up to :data:`READ_CHUNK` bytes) in one call and
serves paho's small reads from memory, and keeps what paho writes until :meth:`flush`, which
sends it in one call. The transport calls :meth:`flush` after each ``loop_write()``; while a
flush left bytes behind (the kernel's buffer was full) :meth:`send` raises
:class:`BlockingIOError`, so further packets stay in paho's own queue, as they would on a full
socket. Bytes read but not yet parsed are invisible to ``epoll``: the reader must ask
:attr:`buffered` and come back on its own while it is true.

Plain (non-TLS) sockets only: a TLS socket has its own record buffer and ``pending()``.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any

#: the most read from the kernel in one ``recv`` (a loopback segment is at most 64 KiB)
READ_CHUNK = 65536
#: how long :meth:`BufferedSocket.close` may block to hand over what is still buffered (a
#: DISCONNECT written just before it), when the kernel's buffer was full
CLOSE_LINGER_S = 0.5


class BufferedSocket:
    """``socket``'s ``recv``/``send``/``close`` over a connected, non-blocking TCP socket,
    buffered in user space (see the module docstring); other attributes are the socket's."""

    __slots__ = ("_blocked", "_in", "_out", "_pos", "_sock")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._in = b""                 # bytes read from the kernel ...
        self._pos = 0                  # ... of which paho has taken this many
        self._out: list[bytes] = []    # written by paho, not yet handed to the kernel
        self._blocked = False          # the last flush left bytes behind

    # ------------------------------------------------------------------ reading
    def recv(self, bufsize: int) -> bytes:
        """Up to ``bufsize`` bytes: from the buffer, else from one ``recv`` of the kernel's
        (``BlockingIOError`` when there is nothing, ``b""`` at the end of the stream)."""
        pos, data = self._pos, self._in
        if pos >= len(data):
            data = self._sock.recv(max(bufsize, READ_CHUNK))
            if len(data) <= bufsize:
                return data
            pos = 0
        end = pos + bufsize
        if end >= len(data):        # all taken: an idle connection keeps no chunk
            self._in, self._pos = b"", 0
        else:
            self._in, self._pos = data, end
        return data[pos:end]

    @property
    def buffered(self) -> bool:
        """Bytes are waiting in memory that ``epoll`` will not report."""
        return self._pos < len(self._in)

    # ------------------------------------------------------------------ writing
    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Keep ``data`` for the next :meth:`flush` (all of it is taken); ``BlockingIOError``
        while the last flush could not hand over everything."""
        if self._blocked:
            raise BlockingIOError("earlier bytes are still waiting for the socket")
        self._out.append(bytes(data))
        return len(data)

    @property
    def pending(self) -> int:
        """Bytes kept by :meth:`send` and not yet handed to the kernel."""
        return sum(map(len, self._out))

    def flush(self) -> bool:
        """Hand the kept bytes to the kernel in one ``send``: True when nothing is left; False
        when the kernel's buffer is full (wait until the socket is writable and flush again).
        ``OSError`` other than a full buffer is raised (the connection is gone)."""
        out = self._out
        if not out:
            self._blocked = False
            return True
        data = out[0] if len(out) == 1 else b"".join(out)
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        if sent == len(data):
            out.clear()
            self._blocked = False
            return True
        self._out = [data[sent:]]
        self._blocked = True
        return False

    def discard(self) -> None:
        """Forget what was kept and not sent (an unclean close)."""
        self._out.clear()
        self._blocked = False

    # ------------------------------------------------------------------ the rest
    def close(self) -> None:
        """Hand over what is still kept (at most :data:`CLOSE_LINGER_S` of blocking, only when
        the kernel's buffer is full), then close."""
        with contextlib.suppress(OSError):
            if not self.flush():
                self._sock.settimeout(CLOSE_LINGER_S)
                self._sock.sendall(self._out[0])
        self._out.clear()
        self._in, self._pos = b"", 0
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    def setsockopt(self, *args: Any) -> None:
        self._sock.setsockopt(*args)

    def __getattr__(self, name: str) -> Any:
        if name in BufferedSocket.__slots__:   # not set yet: no recursion through _sock
            raise AttributeError(name)
        return getattr(self._sock, name)

    def __repr__(self) -> str:
        # cheap: asyncio formats it into the KeyError of every first add_reader (socket's own
        # repr makes two system calls, getsockname and getpeername)
        return f"<BufferedSocket fd={self._sock.fileno()}>"
