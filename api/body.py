"""Reading request bodies the way the contract words its errors."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from litestar import Request

from api.errors import BadRequest
from api.state import app_state

# A JSON escape that may decode to a lone surrogate (json.loads joins valid pairs into one
# character); bodies without one skip the per-string check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
LONE_SURROGATE = "Invalid JSON: a string contains a lone UTF-16 surrogate (such as \\ud800)."


def too_deep(max_depth: int) -> BadRequest:
    return BadRequest(f"Invalid JSON: nested deeper than {max_depth} levels.")


def _finite(text: str) -> float:
    # PostgreSQL's jsonb has no NaN or Infinity: refuse them here rather than fail there.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"Number out of range: {text[:40]}")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes, max_depth: int) -> Any:
    """``raw`` parsed, or the contract's ``Invalid JSON:`` 400: also for nesting deeper than
    ``max_depth``, lone surrogates (no storage, file system or encoder takes them) and
    NaN/Infinity."""
    try:
        value = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:  # far deeper than any limit: the parser's own stack guard
        raise too_deep(max_depth) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"Invalid JSON: {exc}") from None
    surrogates = _SURROGATE_ESCAPE.search(raw) is not None
    # Fewer brackets than the limit cannot nest past it: most bodies skip the walk.
    if surrogates or raw.count(b"[") + raw.count(b"{") > max_depth:
        _check(value, max_depth, surrogates)
    return value


def _check(value: Any, max_depth: int, surrogates: bool) -> None:
    """Iterative (a recursive walk would itself overflow on the inputs it guards against)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                raise too_deep(max_depth)
            for key, child in item.items():
                if surrogates and _SURROGATE.search(key):
                    raise BadRequest(LONE_SURROGATE)
                stack.append((child, depth + 1))
        elif isinstance(item, list):
            if depth > max_depth:
                raise too_deep(max_depth)
            stack.extend((child, depth + 1) for child in item)
        elif surrogates and isinstance(item, str) and not item.isascii() \
                and _SURROGATE.search(item):
            raise BadRequest(LONE_SURROGATE)


async def json_body(request: Request[Any, Any, Any], *, empty_ok: bool = True) -> Any:
    """The parsed JSON body; an empty one is ``None`` when ``empty_ok``, else the parser's
    400 like any unparseable body (the contract's workspace and share endpoints:
    ``Invalid JSON: Expecting value: line 1 column 1 (char 0)``)."""
    raw = await request.body()
    if empty_ok and not raw.strip():
        return None
    return parse_json(raw, app_state(request).settings.max_json_depth)


def query_filters(request: Request[Any, Any, Any], allowed: tuple[str, ...]) -> dict[str, str]:
    """The known filter parameters present in the query string (unknown ones ignored)."""
    if not request.scope.get("query_string"):
        return {}
    return {k: v for k, v in request.query_params.items() if k in allowed}
