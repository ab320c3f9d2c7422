"""Runtime settings from ``UWS_*`` environment variables, read once.

Wiring (which controllers exist) lives in ``config.toml`` (see ``core.config``); what
differs between one deployment of the same wiring and another (addresses, paths,
limits) comes from the environment, so containers and tests can set it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(ValueError):
    """A setting that cannot work as given; the message starts with the variable's name,
    so an operator knows what to fix."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable
        self.problem = problem


def read_secret_file(path: Path | str, variable: str) -> str:
    """The secret a file holds (a container platform's mounted secret), without the line
    end such files usually carry."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(variable, f"the file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise SettingsError(variable, f"cannot read the file {path} ({reason})") from None
    value = text.rstrip("\r\n")
    if not value:
        raise SettingsError(variable, f"the file {path} is empty")
    return value


def secret_from_env(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The secret in environment variable ``name``, or read afresh from the file that
    ``<name>_FILE`` names (so a rotated file is seen at once); "" when neither is set."""
    env = os.environ if environ is None else environ
    file = env.get(f"{name}_FILE", "")
    if file:
        return read_secret_file(file, f"{name}_FILE")
    return env.get(name, "")


# Settings holding a secret, each with a ``<name>_file`` twin naming a file that holds it.
SECRET_SETTINGS = ("database_url", "secret_key", "temporal_api_key")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UWS_", extra="ignore")

    config: Path = Field(REPO_ROOT / "config.toml", description="The wiring file.")
    database_url: str | None = Field(
        None, repr=False,
        description="PostgreSQL DSN (libpq's sslmode, sslrootcert, sslcert and sslkey "
                    "included); unset means the embedded server under data_dir."
    )
    database_url_file: Path | None = Field(
        None, description="A file holding the DSN (it may carry a password)."
    )
    temporal_address: str | None = Field(
        None, description="host:port of Temporal; unset means `uws dev` starts a dev server."
    )
    temporal_namespace: str = "default"
    # Production Temporal (core.temporal validates these and connects with them).
    temporal_tls: bool | None = Field(
        None, description="TLS to Temporal; unset: on when a CA, a client certificate, a "
                          "server name or an API key is given."
    )
    temporal_tls_ca: Path | None = Field(
        None, description="PEM file of the CA that signed the server; unset: system roots."
    )
    temporal_tls_cert: Path | None = Field(None, description="PEM client certificate (mTLS).")
    temporal_tls_key: Path | None = Field(None, description="PEM key of the client certificate.")
    temporal_tls_server_name: str | None = Field(
        None, description="Name to send (SNI) and verify, when it differs from the address."
    )
    temporal_api_key: str | None = Field(None, repr=False, description="A Temporal Cloud API key.")
    temporal_api_key_file: Path | None = Field(None, description="A file holding the API key.")
    temporal_reload_seconds: float = Field(
        30.0, gt=0, description="How often the certificate, key, CA and API key files are "
                                "checked for a new version (used without a restart)."
    )
    temporal_connect_timeout_seconds: float = Field(
        10.0, gt=0, description="Longest wait for a connection to Temporal, TLS included."
    )
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
    # HTTP/1.1 limits enforced by api.http.guard, below the ASGI app.
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
        None, repr=False, description="Signs passthrough tickets and cookies; unset: a key "
                                      "generated once under data_dir."
    )
    secret_key_file: Path | None = Field(None, description="A file holding the secret key.")
    ticket_seconds: float = Field(300.0, description="How long a session link stays usable.")
    session_cookie_seconds: float = Field(
        12 * 3600.0, description="How long the passthrough cookie of a session lasts."
    )
    browser_session_hours: float = Field(
        12.0, gt=0, description="How long a sign-in to the web page (/ui/) lasts."
    )
    login_link_minutes: float = Field(
        10.0, gt=0, description="How long a `uws login-link` link stays usable (once)."
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

    @model_validator(mode="after")
    def _secrets_from_files(self) -> Settings:
        for name in SECRET_SETTINGS:
            path: Path | None = getattr(self, f"{name}_file")
            if path is None:
                continue
            variable = f"UWS_{name.upper()}"
            value = read_secret_file(path, f"{variable}_FILE")
            # Both given is a mistake unless they agree (a parent process exported the
            # value it read from the file).
            if getattr(self, name) not in (None, "", value):
                raise SettingsError(f"{variable}_FILE",
                                    f"set either {variable} or {variable}_FILE, not both")
            setattr(self, name, value)
        return self

    @property
    def resolved_temporal_address(self) -> str:
        return self.temporal_address or "127.0.0.1:7233"


def _explain(exc: ValidationError) -> SettingsError:
    """The first problem pydantic found, named by its environment variable."""
    err = exc.errors()[0]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, SettingsError):
        return cause
    loc = [str(part) for part in err["loc"]]
    variable = "UWS_" + "_".join(loc).upper() if loc else "UWS_* settings"
    # Never echo a secret, nor the whole environment a model-level error carries.
    shown = "" if not loc or loc[0] in SECRET_SETTINGS else f" (got {err.get('input')!r})"
    return SettingsError(variable, f"{err['msg']}{shown}")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        raise _explain(exc) from None
