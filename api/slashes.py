"""Every contract path ends with a slash; a GET without it is redirected (301), as
Django's APPEND_SLASH did for the reference server's clients.

This wraps the whole Litestar app: Litestar's router drops trailing slashes before any
middleware of its own sees the path, so the check must run first.
"""

from __future__ import annotations

from litestar import Litestar
from litestar.types import Receive, Scope, Send

_NO_REDIRECT_PREFIXES = ("/schema", "/passthrough/", "/metrics", "/ui/static/")


class AppendSlash:
    def __init__(self, app: Litestar) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if (
            scope["type"] == "http"
            and scope.get("method") in ("GET", "HEAD")
            and not path.endswith("/")
            and not path.startswith(_NO_REDIRECT_PREFIXES)
        ):
            query = scope.get("query_string", b"")
            location = (scope.get("root_path", "") + path + "/").encode("utf-8", "replace")
            if query:
                location += b"?" + query
            await send({
                "type": "http.response.start",
                "status": 301,
                "headers": [(b"location", location), (b"content-length", b"0")],
            })
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)
