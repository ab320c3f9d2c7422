"""The passthrough relay engine: HTTP and WebSocket traffic to an interactive session.

The caller has already decided who may pass and where to: it hands us raw ASGI
``scope/receive/send`` and a trusted :class:`~api.passthrough.upstream.Upstream`. The
path and query are relayed unchanged (sessions serve under their own
``/passthrough/<hostname>/<job_id>/`` base URL).

:class:`PassthroughRelay` ties the pieces together: the header policy
(:mod:`api.passthrough.headers`), the HTTP relay (:mod:`api.passthrough.http_relay`) and its
pooled upstream client (:mod:`api.passthrough.http_pool`), the WebSocket relay
(:mod:`api.passthrough.websocket_relay`), and the upstream and how we connect to it
(:mod:`api.passthrough.upstream`).
"""

from __future__ import annotations

from collections.abc import Iterable

from api.passthrough.headers import _REQUEST_DROP
from api.passthrough.http_pool import _Pool
from api.passthrough.http_relay import HttpRelayMixin
from api.passthrough.websocket_relay import WebSocketRelayMixin


class PassthroughRelay(HttpRelayMixin, WebSocketRelayMixin):
    """Relays one HTTP request or WebSocket per call to an already-authorised upstream."""

    def __init__(self, *, connect_timeout: float = 10.0, read_timeout: float | None = 300.0,
                 max_connections: int = 200, strip_request_headers: Iterable[str] = (),
                 strip_cookies: Iterable[str] = ()) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._max_connections = max_connections
        self._drop = _REQUEST_DROP | {h.lower().encode("latin-1") for h in strip_request_headers}
        self._strip_cookies = frozenset(strip_cookies)
        self._pool: _Pool | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the idle upstream connections; those in use close when their request ends.
        The relay stays usable (a new pool is made on demand)."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.close()
