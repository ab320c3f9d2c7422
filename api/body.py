"""Reading request bodies the way the contract words its errors."""

from __future__ import annotations

import json
from typing import Any

from litestar import Request

from api.errors import BadRequest


async def json_body(request: Request[Any, Any, Any]) -> Any:
    """The parsed JSON body, or ``None`` for an empty one."""
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"Invalid JSON: {exc}") from None


def query_filters(request: Request[Any, Any, Any], allowed: tuple[str, ...]) -> dict[str, str]:
    """The known filter parameters present in the query string (unknown ones ignored)."""
    if not request.scope.get("query_string"):
        return {}
    return {k: v for k, v in request.query_params.items() if k in allowed}
