"""Public catalogue: job types, job parameters and server status."""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from litestar import Controller, Request, get

from api.state import app_state


def _version() -> str:
    try:
        return version("uws")
    except PackageNotFoundError:
        return "0+unknown"


class CatalogueRoutes(Controller):
    tags = ["catalogue"]

    @get("/job_types/", operation_id="listJobTypes")
    async def list_job_types(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The configured job types by id."""
        config = app_state(request).controllers.config
        return {
            "success": True,
            "message": "Successful.",
            "data": {
                "job_types": {
                    jid: {"id": jid, "name": j.name}
                    for jid, j in config.available_job_types.items()
                }
            },
        }

    @get("/parameters/", operation_id="listParameters")
    async def list_parameters(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The job parameters clients may set in ``resource_options``, as configured."""
        config = app_state(request).controllers.config
        params = []
        for p in config.parameters:
            item = p.model_dump()
            item["validation"] = p.validation.model_dump(exclude_none=True)
            params.append(item)
        return {"success": True, "message": "Successful.", "data": {"parameters": params}}

    @get("/status/", operation_id="getStatus")
    async def get_status(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Version and the health of every configured controller and service."""
        state = app_state(request)
        plugins = state.controllers.all()
        healths = await asyncio.gather(*(p.health() for p in plugins), return_exceptions=True)
        deps: dict[str, Any] = {}
        for plugin, health in zip(plugins, healths, strict=True):
            if isinstance(health, BaseException):
                deps[f"{plugin.kind}:{plugin.name}"] = {"ok": False, "detail": str(health)}
            else:
                deps[f"{plugin.kind}:{plugin.name}"] = health.model_dump()
        deps["database"] = await _database_health()
        deps["temporal"] = await _temporal_health(state)
        return {"success": True, "message": "", "version": _version(), "build": _version(),
                "dependencies": deps}


async def _database_health() -> dict[str, Any]:
    from db.tables import User

    try:
        await asyncio.wait_for(User.raw("SELECT 1"), timeout=3)
        return {"ok": True, "detail": ""}
    except Exception as exc:
        return {"ok": False, "detail": str(exc) or type(exc).__name__}


async def _temporal_health(state: Any) -> dict[str, Any]:
    try:
        await asyncio.wait_for(state.temporal.service_client.check_health(), timeout=3)
        return {"ok": True, "detail": state.settings.resolved_temporal_address}
    except Exception as exc:
        return {"ok": False, "detail": str(exc) or type(exc).__name__}
