"""WebSockets: live job status for ``/jobs/{id}/`` (one job) and ``/jobs/`` (all of the
caller's jobs).

The socket authenticates with the ``UWS-Authorization`` header or a ``token`` query
parameter (browsers cannot set headers on WebSockets), then receives the current state
at once and every change after it; it closes with 4401 for a bad token and 4404 for a job
that is not the caller's.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.params import FromPath

from api.auth import HEADER, AuthUser, user_from_header
from api.browser_auth import cookie_user
from api.errors import NotAuthenticated
from api.ids import parse_id
from api.live_status import RESYNC, Subscription
from api.metrics import WEBSOCKET_SUBSCRIBERS
from api.serializers import origin_of, with_url_domain
from db import jobs as job_rows
from db.sql import as_json

CLOSE_UNAUTHENTICATED = 4401
CLOSE_NOT_FOUND = 4404


async def _socket_user(socket: WebSocket[Any, Any, Any]) -> AuthUser | None:
    header = socket.headers.get(HEADER)
    token = socket.query_params.get("token")
    if header is None and token:
        header = f"Token {token}"
    try:
        if header is None:  # the web page: its cookie, from its own origin only
            return await cookie_user(socket.scope, socket.app.state.uws.secret_key)
        return await user_from_header(header, socket.app.state.uws.token_cache)
    except NotAuthenticated:
        return None


def _event(row: dict[str, Any], origin: str) -> dict[str, Any]:
    details = as_json(row["job_details"])
    return {"id": row["id"], "workspace_id": row["workspace"], "status": row["status"],
            "current_job_details": with_url_domain(details.get("current_job_details", {}),
                                                   origin)}


async def _current(user: AuthUser, job_id: int | None, origin: str,
                   shown: set[int] | None = None) -> list[dict[str, Any]]:
    """The job, or all active jobs plus those in ``shown`` (the ones this socket told of
    before: after a resync, a job that ended meanwhile must show its end, not vanish)."""
    if job_id is not None:
        rows = await job_rows.event_rows(user.id, job_id)
    else:
        rows = await job_rows.active_event_rows(user.id, sorted(shown or ()))
    return [_event(r, origin) for r in rows]


async def _serve(socket: WebSocket[Any, Any, Any], job_id: int | None, raw_id: str) -> None:
    await socket.accept()
    user = await _socket_user(socket)
    if user is None:
        await socket.close(code=CLOSE_UNAUTHENTICATED, reason="Invalid or missing token.")
        return
    bus = socket.app.state.uws.bus
    sub: Subscription = bus.subscribe(user.id, job_id)
    WEBSOCKET_SUBSCRIBERS.inc()
    origin = origin_of(socket)  # the session links' url_domain when config leaves it unset
    try:
        current = await _current(user, job_id, origin)
        if job_id is not None and not current:
            await socket.close(code=CLOSE_NOT_FOUND, reason=f"Job {raw_id} not found for user.")
            return
        for event in current:
            await socket.send_json(event)
        await _pump(socket, sub, user, job_id, origin, {e["id"] for e in current})
    finally:
        bus.unsubscribe(sub)
        WEBSOCKET_SUBSCRIBERS.dec()


async def _pump(socket: WebSocket[Any, Any, Any], sub: Subscription, user: AuthUser,
                job_id: int | None, origin: str, shown: set[int]) -> None:
    """Forward events until the client goes away (its messages are read and ignored)."""
    async def client_gone() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await socket.receive_data(mode="text")

    gone = asyncio.create_task(client_gone())
    try:
        while not gone.done():
            getter = asyncio.create_task(sub.queue.get())
            await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            event = getter.result()
            events = await _current(user, job_id, origin, shown) if event is RESYNC else \
                [_public(event, origin)]
            for item in events:
                shown.add(item["id"])
                await socket.send_json(item)
    except WebSocketDisconnect:
        pass
    finally:
        gone.cancel()


def _public(event: dict[str, Any], origin: str) -> dict[str, Any]:
    public = {k: v for k, v in event.items() if k != "user_id"}
    if "current_job_details" in public:
        public["current_job_details"] = with_url_domain(public["current_job_details"], origin)
    return public


@websocket("/jobs/{job_id:str}/", operation_id="watchJob")
async def watch_job(socket: WebSocket[Any, Any, Any], job_id: FromPath[str]) -> None:
    """Every status change of one of the caller's jobs."""
    parsed = parse_id(job_id)
    await _serve(socket, parsed if parsed is not None else -1, job_id)


@websocket("/jobs/", operation_id="watchJobs")
async def watch_jobs(socket: WebSocket[Any, Any, Any]) -> None:
    """Every status change of all of the caller's jobs."""
    await _serve(socket, None, "")
