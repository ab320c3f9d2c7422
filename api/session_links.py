"""The owner's copy of a running session's URL carries a fresh passthrough ticket."""

from __future__ import annotations

import time
from typing import Any

from api.passthrough import TICKET_PARAM, make_ticket
from core.status import JobStatus


def with_ticket(job: dict[str, Any], user_id: int, key: bytes, ttl: float) -> dict[str, Any]:
    """``job`` (a job's JSON) with a ticket added to its connection URL, when it has one."""
    details = job.get("job_details") or {}
    current = details.get("current_job_details") or {}
    connection = current.get("connection_details") or {}
    path = connection.get("url_path")
    if job.get("status") != JobStatus.running or not isinstance(path, str):
        return job
    ticket = make_ticket(key, job["id"], user_id, now=time.time(), ttl=ttl)
    separator = "&" if "?" in path else "?"
    connection = {**connection, "url_path": f"{path}{separator}{TICKET_PARAM}={ticket}"}
    current = {**current, "connection_details": connection}
    return {**job, "job_details": {**details, "current_job_details": current}}
