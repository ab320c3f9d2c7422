"""Connecting to Temporal, and the search attributes our workflows carry."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.runtime import Runtime

from core.settings import Settings

# name -> type, as `temporal operator search-attribute create` and the dev server take them.
SEARCH_ATTRIBUTES: dict[str, str] = {
    "UwsJobId": "Int",
    "UwsUserId": "Int",
    "UwsWorkspaceId": "Int",
    "UwsJobType": "Keyword",
    "UwsResource": "Keyword",
    "UwsStatus": "Keyword",
}


async def connect(settings: Settings, runtime: Runtime | None = None) -> Client:
    """A client; ``runtime`` carries telemetry (the worker's metrics), default: the SDK's."""
    return await Client.connect(
        settings.resolved_temporal_address, namespace=settings.temporal_namespace,
        runtime=runtime,
    )
