"""Length limits of the free-text fields clients send, checked before anything is written.

Every listing carries these fields back, and the database's own limits (``name`` is a
varchar(256)) would otherwise surface as a 500."""

from __future__ import annotations

import json
from typing import Any

from api.errors import BadRequest
from core.settings import Settings

MAX_NAME_CHARS = 256  # uws_workspace.name is a varchar(256)


def check_workspace_fields(body: dict[str, Any], settings: Settings) -> None:
    """``name`` and ``description`` of a create or update body, once known to be strings."""
    name, description = body.get("name"), body.get("description")
    if isinstance(name, str) and len(name) > MAX_NAME_CHARS:
        raise BadRequest(f"'name' must be at most {MAX_NAME_CHARS} characters.")
    limit = settings.max_description_chars
    if isinstance(description, str) and len(description) > limit:
        raise BadRequest(f"'description' must be at most {limit} characters.")


def check_job_details(job_details: dict[str, Any], settings: Settings) -> None:
    """The serialised size of a job start's ``job_details`` (stored whole in the job row)."""
    limit = settings.max_job_details_bytes
    # Compact and UTF-8, roughly as jsonb stores it; the body limit bounds this dump.
    size = len(json.dumps(job_details, separators=(",", ":"), ensure_ascii=False).encode())
    if size > limit:
        raise BadRequest(f"'job_details' must be at most {limit} bytes as JSON.")
