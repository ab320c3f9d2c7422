"""The Litestar application factory."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from litestar import Litestar
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.template.config import TemplateConfig
from temporalio.client import Client

from api.auth import HEADER, AuthenticationMiddleware
from api.browser_auth import COOKIE as BROWSER_COOKIE
from api.errors import exception_handlers
from api.live_status import JobEventBus
from api.metrics import instrument, metrics_endpoint
from api.openapi import openapi_config
from api.passthrough import PassthroughRelay
from api.passthrough.routes import passthrough
from api.principal import TokenCache
from api.routes.catalogue import CatalogueRoutes
from api.routes.jobs import JobRoutes
from api.routes.live import watch_job, watch_jobs
from api.routes.shares import SharedWorkspaceRoutes
from api.routes.tokens import TokenRoutes
from api.routes.users import UserRoutes
from api.routes.workspaces import WorkspaceRoutes
from api.session_activity import SessionActivity
from api.slashes import AppendSlash
from api.state import AppState
from api.ui.routes import TEMPLATES as UI_TEMPLATES
from api.ui.routes import UiRoutes
from api.ui.routes import static_files as ui_static_files
from controllers.registry import Controllers
from core.secret_key import load_secret_key
from core.settings import Settings
from core.temporal import connect, credentials_reloaded
from db.engine import close_engine, open_engine

log = logging.getLogger("uws.api")


def create_app(
    settings: Settings,
    *,
    controllers: Controllers,
    temporal: Client | None = None,
    extra_handlers: Sequence[Any] = (),
) -> AppendSlash:
    """The ASGI app: Litestar behind the trailing-slash redirect (``.app`` is Litestar).
    ``controllers`` are the configured plugins (``app.controllers.load_controllers``)."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        if not settings.database_url:
            raise RuntimeError("UWS_DATABASE_URL is not set (`uws api` sets it for you)")
        await controllers.prepare()
        engine = await open_engine(settings.database_url)
        client = temporal or await connect(settings)
        bus = JobEventBus(settings.database_url)
        await bus.start()
        activity = SessionActivity()
        await activity.start()
        # The session never sees the caller's API key or web-page session: its code is the
        # user's to run, and a notebook's dependency must not be able to act as its owner.
        relay = PassthroughRelay(strip_request_headers=[HEADER], strip_cookies=[BROWSER_COOKIE])
        app.state.uws = AppState(
            settings=settings, controllers=controllers, temporal=client, bus=bus,
            relay=relay, activity=activity, secret_key=load_secret_key(settings),
            token_cache=TokenCache(settings.token_cache_seconds),
        )
        try:
            # Rotated certificates or API key on disk: the client moves to them in place.
            async with credentials_reloaded(client):
                yield
        finally:
            await relay.aclose()
            await activity.stop()
            await bus.stop()
            await close_engine(engine)

    # JSON logs: Litestar must not replace the root handler `uws` installed (its default
    # logging config does), so every line stays JSON.
    log_config = {"logging_config": None} if settings.log_format == "json" else {}
    return AppendSlash(instrument(Litestar(
        route_handlers=[TokenRoutes, WorkspaceRoutes, JobRoutes, CatalogueRoutes, UserRoutes,
                        SharedWorkspaceRoutes,
                        watch_job, watch_jobs, passthrough, metrics_endpoint,
                        UiRoutes, ui_static_files,
                        *extra_handlers],
        middleware=[AuthenticationMiddleware],
        template_config=TemplateConfig(directory=UI_TEMPLATES, engine=JinjaTemplateEngine),
        exception_handlers=exception_handlers(),
        lifespan=[lifespan],
        request_max_body_size=settings.max_json_body_bytes,
        openapi_config=openapi_config(controllers.config.parameters),
        debug=False,
        **log_config,
    )))
