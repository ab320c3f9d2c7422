"""Public catalogue: job types, job parameters and server status."""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from litestar import Controller, Request, get

from api import schemas
from api.openapi import contract
from api.state import app_state
from controllers.base import Plugin
from db import sql


def _version() -> str:
    try:
        return version("uws")
    except PackageNotFoundError:
        return "0+unknown"


class CatalogueRoutes(Controller):
    tags = ["catalogue"]

    @get("/job_types/", operation_id="listJobTypes",
         **contract("List the job types", schemas.JobTypesResponse, 401, 503, auth=False))
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

    @get("/parameters/", operation_id="listParameters",
         **contract("List the job parameters", schemas.ParametersResponse, 401, 503, auth=False))
    async def list_parameters(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """The job parameters clients may set in ``resource_options``, as configured."""
        config = app_state(request).controllers.config
        params = []
        for p in config.parameters:
            item = p.model_dump()
            item["validation"] = p.validation.model_dump(exclude_none=True)
            params.append(item)
        return {"success": True, "message": "Successful.", "data": {"parameters": params}}

    @get("/status/", operation_id="getStatus",
         **contract("Server version and health", schemas.StatusResponse, 401, 503, auth=False))
    async def get_status(self, request: Request[Any, Any, Any]) -> dict[str, Any]:
        """Version and the health of every configured controller and service, in the
        reference's sections (status dashboards parse them), each health
        ``{"connected": bool, "message": str}``; ``job_types``, ``database`` and
        ``temporal`` are our own, beside them."""
        state = app_state(request)
        ctl = state.controllers
        sections: dict[str, dict[str, Plugin]] = {
            "resources": ctl.resources, "storage_methods": ctl.storage,
            "user_authentication_methods": ctl.auth, "job_types": ctl.job_types,
        }
        # Each plugin is checked once, even where it also stands as main or api method.
        plugins = {id(p): p for group in sections.values() for p in group.values()}
        checked = await asyncio.gather(*(_plugin_health(p) for p in plugins.values()))
        health = dict(zip(plugins, checked, strict=True))
        deps: dict[str, Any] = {
            "main_resource": health[id(ctl.main_resource)],
            "api_user_authentication": health[id(ctl.api_auth)],
        }
        for section, group in sections.items():
            deps[section] = {name: health[id(p)] for name, p in group.items()}
        deps["database"], deps["temporal"] = await asyncio.gather(
            _database_health(), _temporal_health(state))
        return {"success": True, "message": "", "version": _version(), "build": _version(),
                "dependencies": deps}


def _health(connected: bool, message: str) -> dict[str, Any]:
    return {"connected": connected, "message": message}


async def _plugin_health(plugin: Plugin) -> dict[str, Any]:
    try:
        health = await plugin.health()
    except Exception as exc:  # one broken plugin must not hide the others' health
        return _health(False, str(exc) or type(exc).__name__)
    return _health(health.ok, health.detail)


async def _database_health() -> dict[str, Any]:
    try:
        await asyncio.wait_for(sql.ping(), timeout=3)
        return _health(True, "")
    except Exception as exc:
        return _health(False, str(exc) or type(exc).__name__)


async def _temporal_health(state: Any) -> dict[str, Any]:
    try:
        await asyncio.wait_for(state.temporal.service_client.check_health(), timeout=3)
        return _health(True, state.settings.resolved_temporal_address)
    except Exception as exc:
        return _health(False, str(exc) or type(exc).__name__)
