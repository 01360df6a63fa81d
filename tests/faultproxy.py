"""A small fault-injecting TCP proxy: real sockets between a client and a server.

Modes, applied to the first ``count`` connections (later ones pass through):

* ``drop``  - accept, then close the connection at once (connection reset / aborted);
* ``503``   - answer ``HTTP/1.1 503 Service Unavailable`` without contacting the server;
* ``403``   - answer ``HTTP/1.1 403 Forbidden`` (a permanent error, never retried);
* ``404``   - answer ``HTTP/1.1 404 Not Found`` (permanent too: a missing bucket or path);
* ``stall`` - accept and never answer (the client's timeout must fire).

``record=True`` keeps every byte sent upstream (``sent``): what a client really asked, for
requests an emulator accepts but does not act on.

``down()`` takes the endpoint off the network: the listening socket closes (new connections
are refused) and every open connection is cut, as when a server dies. ``down_after(n)`` does
that once ``n`` bytes went upstream, i.e. in the middle of an upload; ``up()`` listens again on
the same port.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator


def _reply(status: str, code: str = "", message: str = "") -> bytes:
    """A whole HTTP reply that closes its connection; an S3-style XML error body if ``code``."""
    body = (
        f'<?xml version="1.0"?><Error><Code>{code}</Code><Message>{message}</Message></Error>\n'
        if code
        else ""
    ).encode()
    kind = b"Content-Type: application/xml\r\n" if body else b""
    head = f"HTTP/1.1 {status}\r\n".encode() + kind
    return head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body


_RESPONSES = {
    "503": _reply("503 Service Unavailable"),
    "403": _reply("403 Forbidden", "AccessDenied", "Access Denied"),
    "404": _reply("404 Not Found", "NoSuchBucket", "No such bucket"),
}


class FaultProxy:
    """Listens on 127.0.0.1 and forwards to ``target_port``, faulting the first connections."""

    def __init__(
        self, target_port: int, mode: str = "pass", count: int = 0, record: bool = False
    ) -> None:
        self.sent: bytearray | None = bytearray() if record else None
        self.target_port = target_port
        self.mode = mode
        self.remaining = count
        self.faulted = 0
        self.connections = 0
        self._lock = threading.Lock()
        self.port = 0
        self._open: list[socket.socket] = []
        self.upstream_bytes = 0
        self._down_after: int | None = None
        self._stalled: list[socket.socket] = []
        self._closed = False
        self.up()
        self.url = f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        """Listen (again, on the same port after :meth:`down`)."""
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        self.port = self._listener.getsockname()[1]
        self.is_down = False
        threading.Thread(target=self._accept_loop, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        """Refuse new connections and cut every open one."""
        with self._lock:
            self.is_down = True
            self._down_after = None
            listener, opened, self._open = self._listener, self._open, []
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        with contextlib.suppress(OSError):
            listener.close()
        for s in opened:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def down_after(self, nbytes: int) -> None:
        """Go :meth:`down` once ``nbytes`` more bytes were sent upstream."""
        with self._lock:
            self._down_after = self.upstream_bytes + nbytes

    def _sent_upstream(self, data: bytes) -> None:
        with self._lock:
            self.upstream_bytes += len(data)
            if self.sent is not None:
                self.sent += data
            trip = self._down_after is not None and self.upstream_bytes >= self._down_after
        if trip:
            self.down()

    def set(self, mode: str, count: int) -> None:
        with self._lock:
            self.mode, self.remaining = mode, count

    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                fault = self.mode if self.remaining > 0 else "pass"
                if fault != "pass":
                    self.remaining -= 1
                    self.faulted += 1
            threading.Thread(target=self._handle, args=(client, fault), daemon=True).start()

    def _handle(self, client: socket.socket, fault: str) -> None:
        if fault == "drop":
            client.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            client.close()  # RST
            return
        if fault in _RESPONSES:
            with contextlib.suppress(OSError):
                client.settimeout(5)
                client.recv(65536)
                client.sendall(_RESPONSES[fault])
            client.close()
            return
        if fault == "stall":
            self._stalled.append(client)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        with self._lock:
            self._open += [client, upstream]
        threading.Thread(
            target=_pipe, args=(client, upstream, self._sent_upstream), daemon=True
        ).start()
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for s in self._stalled:
            with contextlib.suppress(OSError):
                s.close()


def _pipe(
    src: socket.socket, dst: socket.socket, count: Callable[[bytes], None] | None = None
) -> None:
    try:
        while data := src.recv(1 << 16):
            dst.sendall(data)
            if count is not None:
                count(data)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def fault_proxy(target_port: int, record: bool = False) -> Iterator[FaultProxy]:
    proxy = FaultProxy(target_port, record=record)
    try:
        yield proxy
    finally:
        proxy.close()
