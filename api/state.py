"""What every request handler may use, built once per process by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from litestar import Request
from temporalio.client import Client

from api.live_status import JobEventBus
from api.passthrough import PassthroughRelay
from api.principal import TokenCache
from api.session_activity import SessionActivity
from controllers.registry import Controllers
from core.settings import Settings


@dataclass
class AppState:
    settings: Settings
    controllers: Controllers
    temporal: Client
    bus: JobEventBus
    relay: PassthroughRelay
    activity: SessionActivity
    secret_key: bytes
    token_cache: TokenCache = field(default_factory=lambda: TokenCache(5.0))


def app_state(request: Request[Any, Any, Any]) -> AppState:
    return request.app.state.uws
