"""The header policy of the passthrough: which request headers reach the session and how they
are rewritten, which response headers reach the client, and the request target (path and
query, relayed as the client sent them).

Request headers, both protocols:

* dropped: hop-by-hop ones (and those named in ``Connection``), ``Expect`` (the server has
  answered ``100-continue`` already), ``Sec-WebSocket-*`` (the upstream handshake is our
  own), ``X-Real-IP`` and ``X-Scheme`` (Tornado prefers them to ``X-Forwarded-*``, so a
  client could spoof its address), ``strip_request_headers``, and the ``strip_cookies``
  pairs of ``Cookie`` (several ``Cookie`` headers are merged into one);
* ``Host`` becomes the upstream's ``host[:port]`` (port omitted when 80, as the
  ``websockets`` client writes it), ``localhost`` over a Unix socket; ``X-Forwarded-Host``
  the client's ``Host``; ``X-Forwarded-Proto`` ``http``/``https`` from the scope's scheme
  (``ws``/``wss`` mapped); ``scope["client"]`` is appended to ``X-Forwarded-For`` unless
  already its last entry;
* ``Origin`` and ``Referer`` are rewritten to ``http://<upstream host[:port]>``
  (``http://localhost`` over a Unix socket) only when they name the client's ``Host`` (a
  same-origin request): Jupyter compares them with ``Host`` and would otherwise answer
  404/403. Cross-site values pass unchanged, so the session's own cross-origin checks
  still apply.

Response headers pass through except hop-by-hop ones and ``Date``/``Server`` (the ASGI server
adds its own; two ``Date`` headers are invalid). ``Set-Cookie`` headers stay separate,
``Location`` is untouched.
"""

from __future__ import annotations

from urllib.parse import quote, quote_from_bytes, urlsplit

from api.passthrough.common import Scope

_HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"proxy-connection",
})
# Request headers we never forward; see the module docstring for why.
_REQUEST_DROP = _HOP_BY_HOP | {
    b"expect", b"sec-websocket-key", b"sec-websocket-version", b"sec-websocket-extensions",
    b"sec-websocket-protocol", b"sec-websocket-accept", b"x-real-ip", b"x-scheme",
    b"x-forwarded-host", b"x-forwarded-proto",
}
_RESPONSE_DROP = _HOP_BY_HOP | {b"date", b"server"}
# Printable ASCII stays as is in a re-quoted raw path; only other bytes are escaped.
_PATH_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))


class RequestHeadersMixin:
    """The request headers a :class:`~api.passthrough.relay.PassthroughRelay` sends upstream
    (both protocols). Its ``__init__`` sets ``_drop`` and ``_strip_cookies``."""

    _drop: frozenset[bytes]
    _strip_cookies: frozenset[str]

    def _request_headers(self, scope: Scope, authority: str) -> list[tuple[bytes, bytes]]:
        raw: list[tuple[bytes, bytes]] = scope["headers"]
        drop = self._drop
        for name, value in raw:
            if name == b"connection":  # headers it names are hop-by-hop too
                drop = drop | {t.strip().lower() for t in value.split(b",")}
        out: list[tuple[bytes, bytes]] = []
        host = b""
        cookies: list[bytes] = []
        forwarded_for: list[bytes] = []
        same_origin: list[tuple[bytes, bytes]] = []
        for name, value in raw:
            if name in drop:
                continue
            if name == b"host":
                host = value
            elif name == b"cookie":
                cookies.append(value)
            elif name == b"x-forwarded-for":
                forwarded_for.append(value)
            elif name in (b"origin", b"referer"):
                same_origin.append((name, value))
            else:
                out.append((name, value))
        out.append((b"host", authority.encode("latin-1")))
        if host:
            out.append((b"x-forwarded-host", host))
        out.append((b"x-forwarded-proto", _forwarded_proto(scope)))
        if forwarded_for or scope.get("client"):
            out.append((b"x-forwarded-for", _forwarded_for(forwarded_for, scope)))
        cookie = self._filter_cookies(cookies)
        if cookie:
            out.append((b"cookie", cookie))
        for name, value in same_origin:
            out.append((name, _rewrite_origin(value, host, authority)))
        return out

    def _filter_cookies(self, headers: list[bytes]) -> bytes:
        if not self._strip_cookies:
            return b"; ".join(headers)
        kept = []
        for header in headers:
            for pair in header.split(b";"):
                pair = pair.strip()
                name = pair.split(b"=", 1)[0].strip().decode("latin-1")
                if pair and name not in self._strip_cookies:
                    kept.append(pair)
        return b"; ".join(kept)


def _target(scope: Scope) -> str:
    """Path and query as the client sent them, ready for a URL."""
    raw = scope.get("raw_path")
    if raw:
        path = _ascii(raw)
    else:
        path = quote(scope["path"], safe="/!$&'()*+,;=:@~%")
    query: bytes = scope.get("query_string", b"")
    if not query:
        return path
    return f"{path}?{_ascii(query)}"


def _ascii(raw: bytes) -> str:
    """Raw URL bytes as text, any non-ASCII byte percent-encoded (browsers do it anyway)."""
    return raw.decode("ascii") if raw.isascii() else quote_from_bytes(raw, _PATH_SAFE)


def _forwarded_proto(scope: Scope) -> bytes:
    return b"https" if scope.get("scheme") in ("https", "wss") else b"http"


def _forwarded_for(values: list[bytes], scope: Scope) -> bytes:
    """The incoming chain plus the client. Behind a trusted proxy uvicorn already took the
    client from that chain (``proxy_headers``): it is not appended twice."""
    chain = b", ".join(values)
    client = scope.get("client")
    if not client:
        return chain
    address = str(client[0]).encode("latin-1")
    if not chain:
        return address
    if chain.rsplit(b",", 1)[-1].strip() == address:
        return chain
    return chain + b", " + address


def _rewrite_origin(value: bytes, host: bytes, authority: str) -> bytes:
    """Point a same-origin ``Origin``/``Referer`` at the upstream (see module docstring)."""
    try:
        parts = urlsplit(value.decode("latin-1"))
    except ValueError:
        return value
    if not host or parts.netloc.lower().encode("latin-1") != host.lower():
        return value
    return parts._replace(scheme="http", netloc=authority).geturl().encode("latin-1")


def _response_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    drop = _RESPONSE_DROP
    for name, value in raw:
        if name.lower() == b"connection":
            drop = drop | {t.strip().lower() for t in value.split(b",")}
    return [(name.lower(), value) for name, value in raw if name.lower() not in drop]
