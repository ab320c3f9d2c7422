"""A TLS-terminating TCP proxy in front of a plaintext server (the Temporal dev server).

It runs on threads of its own (blocking sockets: OpenSSL then sends its alerts, "unknown
CA" or "certificate required", as a real server does), so tests that block their own loop
never stall it. gRPC runs over HTTP/2, so it offers ALPN ``h2``. With ``client_ca`` it
requires a client certificate signed by that CA (a self-hosted Temporal with mTLS), records
the serial number of every one it accepted, and can revoke one: its connections are cut
and new ones refused, so a test knows that a process really moved to a new certificate.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

HANDSHAKE_TIMEOUT_S = 10


class TlsProxy:
    def __init__(self, upstream: str, cert: Path, key: Path, client_ca: Path | None) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._context.load_cert_chain(cert, key)
        self._context.set_alpn_protocols(["h2"])
        if client_ca is not None:
            self._context.load_verify_locations(client_ca)
            self._context.verify_mode = ssl.CERT_REQUIRED
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.accepted_serials: list[int] = []
        self.refused: list[str] = []  # why each refused handshake failed, on our side
        self._revoked: set[int] = set()
        self._open: dict[ssl.SSLSocket, int | None] = {}
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> TlsProxy:
        threading.Thread(target=self._accept, daemon=True, name="tls-proxy").start()
        return self

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
        with self._lock:
            for sock in list(self._open):
                _shut(sock)

    def revoke(self, serial: int) -> None:
        """Refuse the certificate from now on and cut every connection made with it."""
        with self._lock:
            self._revoked.add(serial)
            for sock, seen in list(self._open.items()):
                if seen == serial:
                    _shut(sock)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(HANDSHAKE_TIMEOUT_S)
        try:
            tls = self._context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            self.refused.append(str(exc))
            raw.close()
            return
        tls.settimeout(None)
        peer = tls.getpeercert()
        serial = int(peer["serialNumber"], 16) if peer else None
        with self._lock:
            if serial is not None and serial in self._revoked:
                _shut(tls)
                return
            if serial is not None:
                self.accepted_serials.append(serial)
            self._open[tls] = serial
        try:
            upstream = socket.create_connection(self._upstream, timeout=10)
        except OSError:
            self._forget(tls)
            return
        upstream.settimeout(None)
        back = threading.Thread(target=_pipe, args=(upstream, tls), daemon=True)
        back.start()
        _pipe(tls, upstream)
        back.join()
        self._forget(tls)

    def _forget(self, tls: ssl.SSLSocket) -> None:
        with self._lock:
            self._open.pop(tls, None)
        _shut(tls)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    # One side ended: end both, so that neither end waits for ever.
    _shut(source)
    _shut(sink)


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


@contextlib.contextmanager
def running(proxy: TlsProxy) -> Iterator[TlsProxy]:
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
