"""``/passthrough/{hostname}/{job_id}/{path}``: the owner's way into a running session,
over HTTP (every method) and WebSocket.

Only the job's owner passes, only while the job runs, and only to the upstream the job
registered (a Unix socket owned by the owner, or a remote host and port): the URL's
hostname must match, and nothing in the request chooses where we connect (no server-side
request forgery). The path must stay under the session's own prefix: a ``.`` or ``..``
segment (however encoded) is refused before anything else is looked at. Our own
credentials (the API header and the session cookie) are removed before the request is
relayed.
"""

from __future__ import annotations

import html
import json
import os
import time
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode

from litestar import asgi
from litestar.types import Receive, Scope, Send

from api.auth import HEADER, user_from_header
from api.errors import NotAuthenticated
from api.ids import parse_id
from api.metrics import count_relayed
from api.passthrough.tickets import (
    TICKET_PARAM,
    cookie_name,
    make_cookie,
    read_cookie,
    read_ticket,
)
from api.passthrough.upstream import Upstream
from core.status import JobStatus
from db import accounts
from db import jobs as job_rows
from db.sql import as_json

_HEADER_BYTES = HEADER.encode()
STARTING = "This session is still starting. Try again in a moment."
INVALID_PATH = "Invalid session path."


class Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    return list(scope.get("headers", []))


def _cookies(scope: Scope) -> SimpleCookie:
    jar: SimpleCookie = SimpleCookie()
    for key, value in _headers(scope):
        if key == b"cookie":
            try:
                jar.load(value.decode("latin-1"))
            except Exception:
                continue
    return jar


def path_stays_in_session(raw_path: str) -> bool:
    """Whether the path, decoded once as the session's server decodes it, has no ``.`` or
    ``..`` segment and no NUL. ``%2e``/``%2E`` decode to dots and ``%2F`` to a slash before
    the split; a backslash counts as a slash too (``..\\`` is a parent to some servers).
    With no such segment the path cannot climb out of ``/passthrough/<hostname>/<job_id>/``
    to another session or to the session server's own root."""
    path = unquote(raw_path)
    if "\x00" in path:
        return False
    return not any(part in (".", "..") for part in path.replace("\\", "/").split("/"))


def _split(scope: Scope) -> tuple[str, int]:
    raw = scope.get("raw_path") or scope["path"].encode()
    if not path_stays_in_session(raw.decode("latin-1")):
        raise Denied(400, INVALID_PATH)  # before any lookup: such a path never connects
    parts = unquote(raw.decode("latin-1")).split("/", 4)
    # ["", "passthrough", hostname, job_id, rest...]
    if len(parts) < 4 or parts[1] != "passthrough" or not parts[2]:
        raise Denied(404, "No such session.")
    job_id = parse_id(parts[3])
    if job_id is None:
        raise Denied(404, "No such session.")
    return parts[2], job_id


async def _session_owner(scope: Scope, state: Any, job_id: int) -> tuple[int | None, str | None]:
    """The user this request speaks for, and a ticket nonce to spend (if it came with one)."""
    now = time.time()
    query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    if TICKET_PARAM in query:
        ticket = read_ticket(state.secret_key, query[TICKET_PARAM], job_id=job_id, now=now)
        if ticket is None:
            raise Denied(403, "This session link has expired or is not valid. Open the "
                              "session again from your workspaces page.")
        return ticket.user_id, ticket.nonce
    morsel = _cookies(scope).get(cookie_name(job_id))
    if morsel is not None:
        user_id = read_cookie(state.secret_key, morsel.value, job_id=job_id, now=now)
        if user_id is not None:
            return user_id, None
    header = next((v.decode("latin-1") for k, v in _headers(scope) if k == _HEADER_BYTES), None)
    try:
        user = await user_from_header(header, state.token_cache)
    except NotAuthenticated as err:
        raise Denied(401, err.message) from None
    if user is None:
        raise Denied(401, "Open this session from your workspaces page to sign in to it.")
    return user.id, None


async def _upstream(user_id: int, job_id: int, hostname: str) -> Upstream:
    row = await job_rows.session_of(job_id)
    if row is None or row["user"] != user_id:
        raise Denied(404, "No such session.")  # someone else's job looks like no job
    if row["status"] != JobStatus.running:
        raise Denied(403, f"This session has ended (its job is {row['status']}).")
    details = as_json(row["job_details"])
    current = details.get("current_job_details") if isinstance(details, dict) else None
    proxy = current.get("proxy_details") if isinstance(current, dict) else None
    return upstream_from_proxy(proxy, hostname)


def upstream_from_proxy(proxy: Any, hostname: str) -> Upstream:
    """The upstream a job's ``proxy_details`` names, for a request to ``hostname``.

    Local jobs: ``{"socket": "/abs/jupyter.sock", "uid": <owner uid>, "hostname": ...,
    "path": ...}``; remote ones (a compute node): ``{"hostname", "port", "path"}``. The
    URL's hostname must equal ``hostname`` in both (403). Anything missing or malformed is a
    session not ready yet (503), never a 500."""
    if not isinstance(proxy, dict) or not proxy:
        raise Denied(503, STARTING)
    registered = proxy.get("hostname")
    if not isinstance(registered, str) or not registered:
        raise Denied(503, STARTING)
    if registered != hostname:
        raise Denied(403, "This session is not served from that host.")
    if "socket" in proxy:
        path, uid = proxy["socket"], proxy.get("uid")
        # type() rather than isinstance(): True is an int too.
        if (not isinstance(path, str) or not os.path.isabs(path) or "\x00" in path
                or type(uid) is not int or uid < 0):
            raise Denied(503, STARTING)
        return Upstream.unix(path, uid)
    port = proxy.get("port")
    if isinstance(port, str) and port.isascii() and port.isdigit():
        port = int(port)  # accepted before, as int(proxy["port"])
    if type(port) is not int or not 0 < port < 65536:
        raise Denied(503, STARTING)
    return Upstream(host=registered, port=port)


def _without_our_credentials(scope: Scope, job_id: int) -> Scope:
    """Drop the API header and our session cookie; keep the session's own cookies."""
    ours = cookie_name(job_id)
    headers = []
    for key, value in _headers(scope):
        if key == _HEADER_BYTES:
            continue
        if key == b"cookie":
            kept = [c for c in value.decode("latin-1").split(";")
                    if c.strip() and c.split("=", 1)[0].strip() != ours]
            if not kept:
                continue
            value = ";".join(kept).strip().encode("latin-1")
        headers.append((key, value))
    return {**scope, "headers": headers}


async def _deny(scope: Scope, receive: Receive, send: Send, denied: Denied) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 4000 + denied.status,
                    "reason": denied.message[:120]})
        return
    accept = next((v for k, v in _headers(scope) if k == b"accept"), b"")
    if b"text/html" in accept:
        body = (f"<!doctype html><title>Session unavailable</title><h1>{denied.status}</h1>"
                f"<p>{html.escape(denied.message)}</p>").encode()
        content_type = b"text/html; charset=utf-8"
    else:
        body = json.dumps({"success": False, "message": denied.message}).encode()
        content_type = b"application/json"
    await send({"type": "http.response.start", "status": denied.status,
                "headers": [(b"content-type", content_type),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _exchange_ticket(scope: Scope, send: Send, state: Any, job_id: int, user_id: int,
                           nonce: str) -> None:
    """Spend the ticket, set the cookie, and send the browser to the same URL without it."""
    if not await accounts.spend_link_ticket(nonce, state.settings.ticket_seconds):
        raise Denied(403, "This session link was already used. Open the session again from "
                          "your workspaces page.")
    query = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                          keep_blank_values=True) if k != TICKET_PARAM]
    raw = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    location = raw + ("?" + urlencode(query) if query else "")
    hostname = raw.split("/")[2]
    value = make_cookie(state.secret_key, job_id, user_id, now=time.time(),
                        ttl=state.settings.session_cookie_seconds)
    secure = "; Secure" if scope.get("scheme") == "https" else ""
    cookie = (f"{cookie_name(job_id)}={value}; Path=/passthrough/{hostname}/{job_id}/; "
              f"HttpOnly; SameSite=Lax; Max-Age={int(state.settings.session_cookie_seconds)}"
              f"{secure}")
    await send({"type": "http.response.start", "status": 302,
                "headers": [(b"location", location.encode("latin-1")),
                            (b"set-cookie", cookie.encode("latin-1")),
                            (b"cache-control", b"no-store"), (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


@asgi("/passthrough", is_mount=True, copy_scope=True)
async def passthrough(scope: Scope, receive: Receive, send: Send) -> None:
    """Relay to the owner's running session (HTTP and WebSocket)."""
    state = scope["app"].state.uws
    try:
        hostname, job_id = _split(scope)
        user_id, nonce = await _session_owner(scope, state, job_id)
        assert user_id is not None
        upstream = await _upstream(user_id, job_id, hostname)
        if nonce is not None:
            if scope["type"] != "http":
                raise Denied(403, "Open the session in a browser first.")
            await _exchange_ticket(scope, send, state, job_id, user_id, nonce)
            return
    except Denied as denied:
        await _deny(scope, receive, send, denied)
        return
    clean = _without_our_credentials(scope, job_id)
    touch = state.activity.touch_callback(job_id)
    receive, send = count_relayed(receive, send)  # bytes both ways, for /metrics
    if scope["type"] == "websocket":
        await state.relay.websocket(clean, receive, send, upstream, on_activity=touch)
    else:
        await state.relay.http(clean, receive, send, upstream, on_activity=touch)
