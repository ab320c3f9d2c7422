"""The one place the API's uvicorn is configured: ``uws api`` and the tests' server both
build it here, so the HTTP limits of ``core.http_guard`` hold wherever the app is served."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from api.http.access_log import AccessLog
from api.http.guard import HttpLimits, guarded_protocol
from core.settings import Settings


def uvicorn_config(app: Any, settings: Settings, *, host: str | None = None,
                   port: int | None = None, log_level: str = "warning",
                   access_log: bool | None = None, **extra: Any) -> uvicorn.Config:
    """uvicorn's config for ``app`` under ``settings``; ``access_log`` None: the setting."""
    access = settings.access_log if access_log is None else access_log
    if access:
        app = AccessLog(app)
        # Asked for explicitly: --log-level (uvicorn's loggers only) must not hide it.
        logging.getLogger("uws.access").setLevel(logging.INFO)
    # JSON: uvicorn's own loggers propagate to ours instead of getting its text handlers.
    logs = {"log_config": None} if settings.log_format == "json" else {}
    return uvicorn.Config(
        app,
        host=host or settings.host,
        port=settings.port if port is None else port,
        log_level=log_level,
        access_log=False,  # uvicorn's prints query strings (tickets, tokens): ours instead
        http=guarded_protocol(HttpLimits.from_settings(settings, access_log=access)),
        # Also set for uvicorn's own bookkeeping; the guard answers it in the envelope.
        limit_concurrency=settings.max_connections or None,
        **{**logs, **extra},
    )
