"""Where a session answers (:class:`Upstream`) and the one way we connect to it
(:func:`_open_socket`, used by both the HTTP pool and the WebSocket client).

An upstream is TCP ``host:port`` (a remote compute node) or a Unix socket (a local job). A
socket is opened without following a link and only when it is a socket owned by the
session's owner (:func:`_open_unix`): its name lives in a directory the owner can write, so
the owner could swap it for a link to someone else's session.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import stat
from dataclasses import dataclass

from websockets.headers import build_host

# Host (and same-origin Origin) of requests over a Unix socket: Jupyter compares the two.
UNIX_AUTHORITY = "localhost"


@dataclass(frozen=True)
class Upstream:
    """Where a session answers: TCP ``host:port``, or the Unix socket ``socket_path`` (then
    ``host``/``port`` are unused; see :meth:`unix`). ``socket_uid``: the socket must be
    owned by that uid (``None``: any owner). Hashable: it keys the connection pool."""

    host: str
    port: int
    socket_path: str | None = None
    socket_uid: int | None = None

    def __post_init__(self) -> None:
        # A relative name would be resolved against our working directory.
        if self.socket_path is not None and not os.path.isabs(self.socket_path):
            raise ValueError(f"socket path must be absolute: {self.socket_path!r}")

    @classmethod
    def unix(cls, path: str, uid: int | None = None) -> Upstream:
        return cls(UNIX_AUTHORITY, 80, socket_path=path, socket_uid=uid)


@functools.lru_cache(maxsize=4096)
def upstream_authority(upstream: Upstream) -> str:
    """``host[:port]`` exactly as the ``websockets`` client writes ``Host``; ``localhost``
    for a Unix socket."""
    if upstream.socket_path is not None:
        return UNIX_AUTHORITY
    return build_host(upstream.host, upstream.port, secure=False)


async def _open_socket(upstream: Upstream, timeout: float) -> socket.socket:
    """A connected non-blocking socket to the upstream (TCP or Unix), within ``timeout``
    seconds. The one connector of both the HTTP pool and the WebSocket client."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        if upstream.socket_path is not None:
            return await _open_unix(loop, upstream.socket_path, upstream.socket_uid)
        infos = await loop.getaddrinfo(upstream.host, upstream.port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"no address for {upstream.host}")
        for family, kind, proto, _, address in infos:
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames now
            try:
                await loop.sock_connect(sock, address)
                return sock
            except OSError as exc:
                sock.close()
                error = exc
            except BaseException:
                sock.close()
                raise
        raise error


async def _open_unix(loop: asyncio.AbstractEventLoop, path: str, uid: int | None
                     ) -> socket.socket:
    """Connect to the socket inode ``path`` names now, never through a link.

    ``O_PATH | O_NOFOLLOW`` pins the final name without following it (a link is opened as
    the link itself, and fails the socket check); connecting to ``/proc/self/fd/N`` then
    reaches that very inode, so a rename between the check and the connect changes nothing.
    A wrong type or owner is an ``OSError``: to the client, a session not answering."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{path} is not a socket")
        if uid is not None and st.st_uid != uid:
            raise OSError(f"{path} is owned by uid {st.st_uid}, not {uid}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # no TCP_NODELAY on AF_UNIX
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, f"/proc/self/fd/{fd}")
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(fd)
