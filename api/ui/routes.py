"""``/ui/``: the researchers' home page, served by the API process.

The pages are shells rendered here (who is signed in, the CSRF token, which page); the
data and every action go through the public REST and WebSocket API from the page's own
script (``static/uws.js``), authenticated by the HttpOnly session cookie
(``api.browser_auth``). Sign-in is a one-time link (``uws login-link``) or, where the
configured method has a provider, the authorization-code flow with PKCE.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from litestar import Controller, MediaType, Request, Response, get, post
from litestar.datastructures import Cookie
from litestar.params import FromPath, FromQuery, QueryParameter
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router

from api.auth import current_user
from api.browser_auth import COOKIE, cookie_value, csrf_token
from api.errors import ApiError, controller_status
from api.serializers import origin_of
from api.sign_in import admit
from api.state import app_state
from controllers.errors import ControllerError
from db import accounts

log = logging.getLogger("uws.api")
HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
FLOW_COOKIE = "uws_signin_flow"
FLOW_SECONDS = 600
# No script or style from anywhere else, none inline, no framing: an injected tag can do
# nothing, and the page cannot be clickjacked.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; "
       "form-action 'self'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
           "referrer-policy": "same-origin", "cache-control": "no-store"}
BAD_LINK = "This sign-in link is invalid, already used or expired. Ask for a new one."


def _secure(request: Request[Any, Any, Any]) -> bool:
    return origin_of(request).startswith("https://")


def _session_cookie(request: Request[Any, Any, Any], key: str, max_age: int) -> Cookie:
    return Cookie(key=COOKIE, value=key, path="/", httponly=True, samesite="lax",
                  secure=_secure(request), max_age=max_age)


def _page(request: Request[Any, Any, Any], name: str, status_code: int = 200,
          **context: Any) -> Template:
    state = app_state(request)
    user = request.scope.get("state", {}).get("user")
    key = cookie_value(request.scope["headers"])
    auth = state.controllers.api_auth
    return Template(template_name=name, status_code=status_code, headers=HEADERS, context={
        "user": user, "csrf": csrf_token(state.secret_key, key) if user and key else "",
        "provider_sign_in": auth.web_sign_in, "provider_name": auth.name, **context})


async def _signed_in(request: Request[Any, Any, Any], user_id: int) -> Response[Any]:
    """A fresh session for ``user_id``, as the HttpOnly cookie, and off to the home page."""
    hours = app_state(request).settings.browser_session_hours
    key = await accounts.issue_browser_session(user_id, timedelta(hours=hours))
    response: Response[Any] = Redirect("/ui/", status_code=303)
    response.cookies.append(_session_cookie(request, key, int(hours * 3600)))
    response.cookies.append(Cookie(key=FLOW_COOKIE, value="", path="/ui/", max_age=0))
    return response


def _sign_flow(secret: bytes, body: dict[str, Any]) -> str:
    raw = base64.urlsafe_b64encode(json.dumps(body).encode()).decode()
    mac = hmac.new(secret, b"uws-signin:" + raw.encode(), hashlib.sha256).hexdigest()
    return f"{raw}.{mac}"


def _read_flow(secret: bytes, value: str | None) -> dict[str, Any] | None:
    raw, _, mac = (value or "").partition(".")
    good = hmac.new(secret, b"uws-signin:" + raw.encode(), hashlib.sha256).hexdigest()
    if not raw or not hmac.compare_digest(mac, good):
        return None
    body = json.loads(base64.urlsafe_b64decode(raw))
    return body if isinstance(body, dict) and body.get("expires", 0) > time.time() else None


def _callback_url(request: Request[Any, Any, Any]) -> str:
    return f"{origin_of(request)}/ui/login/callback/"


class UiRoutes(Controller):
    path = "/ui"
    include_in_schema = False

    @get("/", media_type=MediaType.HTML)
    async def home(self, request: Request[Any, Any, Any]) -> Template:
        if request.scope.get("state", {}).get("user") is None:
            return _page(request, "signin.html")
        return _page(request, "home.html", page="home")

    @get("/workspaces/{workspace_id:int}/", media_type=MediaType.HTML)
    async def workspace(self, request: Request[Any, Any, Any], workspace_id: FromPath[int]) -> Any:
        if request.scope.get("state", {}).get("user") is None:
            return Redirect("/ui/", status_code=303)
        return _page(request, "workspace.html", page="workspace", workspace_id=workspace_id)

    @get("/jobs/{job_id:int}/", media_type=MediaType.HTML)
    async def job(self, request: Request[Any, Any, Any], job_id: FromPath[int]) -> Any:
        if request.scope.get("state", {}).get("user") is None:
            return Redirect("/ui/", status_code=303)
        return _page(request, "job.html", page="job", job_id=job_id)

    @get("/login/", media_type=MediaType.HTML)
    async def login(self, request: Request[Any, Any, Any], ticket: FromQuery[str] = "") -> Any:
        """A link from ``uws login-link``: spent once, then a session cookie."""
        user_id = await accounts.spend_login_ticket(ticket)
        if user_id is None:
            return _page(request, "signin.html", status_code=400, error=BAD_LINK)
        return await _signed_in(request, user_id)

    @post("/logout/", status_code=303, media_type=MediaType.HTML)
    async def logout(self, request: Request[Any, Any, Any]) -> Response[Any]:
        current_user(request)  # the cookie, with the CSRF header (api.browser_auth)
        key = cookie_value(request.scope["headers"])
        if key:
            await accounts.end_browser_session(key)
        response: Response[Any] = Redirect("/ui/", status_code=303)
        response.cookies.append(Cookie(key=COOKIE, value="", path="/", max_age=0,
                                       httponly=True, samesite="lax", secure=_secure(request)))
        return response

    @get("/login/provider/", media_type=MediaType.HTML)
    async def provider_sign_in(self, request: Request[Any, Any, Any]) -> Any:
        """Off to the identity provider, with PKCE; the verifier and state wait in a signed
        cookie of this path for the way back."""
        state = app_state(request)
        auth = state.controllers.api_auth
        if not auth.web_sign_in:
            return _page(request, "signin.html", status_code=404,
                         error="This server has no provider sign-in for the web page.")
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(
            hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        flow_state = secrets.token_urlsafe(16)
        url = await auth.authorization_request(_callback_url(request), flow_state, challenge)
        response: Response[Any] = Redirect(url, status_code=303)
        flow = {"state": flow_state, "verifier": verifier, "expires": time.time() + FLOW_SECONDS}
        response.cookies.append(Cookie(
            key=FLOW_COOKIE, value=_sign_flow(state.secret_key, flow), path="/ui/",
            httponly=True, samesite="lax", secure=_secure(request), max_age=FLOW_SECONDS))
        return response

    @get("/login/callback/", media_type=MediaType.HTML)
    async def provider_callback(self, request: Request[Any, Any, Any],
                                code: FromQuery[str] = "",
                                returned_state: Annotated[str, QueryParameter(name="state")] = "",
                                error: FromQuery[str] = "") -> Any:
        app = app_state(request)
        flow = _read_flow(app.secret_key, request.cookies.get(FLOW_COOKIE))
        if error or not code or flow is None or not hmac.compare_digest(
                returned_state.encode(), str(flow.get("state", "")).encode()):
            return _page(request, "signin.html", status_code=400,
                         error="The sign-in did not complete. Please try again.")
        auth = app.controllers.api_auth
        try:
            token = await auth.redeem_code(code, str(flow["verifier"]), _callback_url(request))
            info = await auth.identify({"auth_token": token}, accounts.is_api_client)
            user_id = await admit(auth, info)
        except ControllerError as exc:  # refused (401), not admitted (403), provider down
            log.warning("web sign-in refused: %s", exc.log_message)
            return _page(request, "signin.html", status_code=controller_status(exc),
                         error=exc.user_message)
        except ApiError as exc:  # a taken or reserved username
            return _page(request, "signin.html", status_code=exc.status_code,
                         error=exc.message)
        return await _signed_in(request, user_id)


static_files = create_static_files_router(path="/ui/static", directories=[HERE / "static"],
                                          include_in_schema=False, name="ui-static")
