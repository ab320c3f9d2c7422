"""Runtime settings from ``UWS_*`` environment variables, read once.

Wiring (which controllers exist) lives in ``config.toml`` (see ``core.config``); what
differs between one deployment of the same wiring and another (addresses, paths,
limits) comes from the environment, so containers and tests can set it.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UWS_", extra="ignore")

    config: Path = Field(REPO_ROOT / "config.toml", description="The wiring file.")
    database_url: str | None = Field(
        None, description="PostgreSQL DSN; unset means the embedded server under data_dir."
    )
    temporal_address: str | None = Field(
        None, description="host:port of Temporal; unset means `uws dev` starts a dev server."
    )
    temporal_namespace: str = "default"
    task_queue: str = "uws"
    data_dir: Path = Field(REPO_ROOT / ".uws", description="Embedded state and workspaces.")
    host: str = "127.0.0.1"
    port: int = 8000
    temporal_ui_port: int = 8233
    max_upload_bytes: int = Field(
        10 * 1024**3, description="Largest single upload request; past it the API answers 413."
    )
    max_json_body_bytes: int = Field(
        64 * 1024**2, description="Largest JSON request body (workspace file contents included)."
    )
    max_json_depth: int = Field(
        32, description="Deepest nesting of arrays and objects in a JSON body (the contract's "
                        "bodies need 4; a deeper one answers 400 `Invalid JSON: ...`)."
    )
    max_description_chars: int = Field(
        64 * 1024, description="Longest workspace description, in characters (every listing "
                               "carries it)."
    )
    max_job_details_bytes: int = Field(
        1024**2, description="Largest `job_details` of a job start, as JSON bytes (the job row "
                             "and every job listing carry it)."
    )
    # HTTP/1.1 limits enforced by core.http_guard, below the ASGI app.
    max_header_bytes: int = Field(
        64 * 1024, description="Largest request line plus headers of one request (431 past it)."
    )
    max_header_count: int = Field(
        100, description="Most header fields in one request (431 past it)."
    )
    header_timeout_seconds: float = Field(
        30.0, description="Longest time to receive a request's line and headers, counted from "
                          "its first byte (from the connection's opening for the first "
                          "request); then 408 and the connection is closed."
    )
    body_timeout_seconds: float = Field(
        60.0, description="Longest pause while a request body is being received (not counting "
                          "pauses the server asks for); then 408 and the connection is closed."
    )
    max_connections: int = Field(
        1000, description="Open connections (WebSockets included) per API process; requests "
                          "past it answer 503 (uvicorn's limit_concurrency)."
    )
    access_log: bool = Field(
        False, description="One log line per request: method, path (never the query string), "
                           "status, duration. `uws api --access-log` turns it on too."
    )
    token_cache_seconds: float = Field(
        5.0, description="How long an API process trusts a token lookup before asking again."
    )

    secret_key: str | None = Field(
        None, description="Signs passthrough tickets and cookies; unset: a key generated "
                          "once under data_dir."
    )
    ticket_seconds: float = Field(300.0, description="How long a session link stays usable.")
    session_cookie_seconds: float = Field(
        12 * 3600.0, description="How long the passthrough cookie of a session lasts."
    )

    log_format: Literal["text", "json"] = Field(
        "text", description="`json`: one JSON object per log line, for log collectors."
    )
    worker_metrics_port: int | None = Field(
        None, description="Port of the worker's Prometheus endpoint for Temporal SDK metrics; "
                          "unset: off."
    )
    worker_job_metrics_port: int | None = Field(
        None, description="Port of the worker's Prometheus endpoint for job counts by status "
                          "and resource; unset: off."
    )
    worker_shutdown_seconds: float = Field(
        30.0, ge=0, description="On SIGTERM, how long the worker lets running activities "
                                "finish (or heartbeat) before it cancels them."
    )

    @property
    def resolved_temporal_address(self) -> str:
        return self.temporal_address or "127.0.0.1:7233"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
