"""The real API plus one unauthenticated route returning a constant, for ``api_throughput``.

``python -m bench.serve_api`` (from the repository root) with the usual ``UWS_*`` variables
and ``UWS_BENCH_CONSTANT_FILE``: the JSON body ``GET /bench/constant/`` returns. Both routes
go through the same app, middleware and guards, so the difference between them is the
token lookup, the database read and the serialisation of the real handler.
"""

from __future__ import annotations

import os
from pathlib import Path

import uvicorn
from litestar import MediaType, get

from api.app import create_app
from app.controllers import load_controllers
from app.dev_database import resolve_database_url
from core.settings import get_settings

CONSTANT_ENV = "UWS_BENCH_CONSTANT_FILE"


def _load_constant() -> bytes:
    path = os.environ.get(CONSTANT_ENV)
    if not path:
        raise SystemExit(f"{CONSTANT_ENV} must name the JSON file /bench/constant/ serves")
    return Path(path).read_bytes()


# Read once at import: the constant route must cost nothing but the framework.
CONSTANT_BODY = _load_constant()


@get("/bench/constant/", media_type=MediaType.JSON, operation_id="benchConstant")
async def constant_handler() -> bytes:
    return CONSTANT_BODY


def main() -> None:
    settings = get_settings()
    resolve_database_url(settings)
    app = create_app(settings, controllers=load_controllers(settings),
                     extra_handlers=[constant_handler])
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning",
                access_log=False)


if __name__ == "__main__":
    main()
