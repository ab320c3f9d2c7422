"""Process-wide logging: human-readable text, or one JSON object per line for collectors
(``UWS_LOG_FORMAT=json``). Standard library only."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# Ids a log call may attach with ``extra={...}``; they become top-level JSON keys so log
# searches can filter on them.
CONTEXT_KEYS = ("job_id", "workspace_id", "user_id")
# What an access log line (api.http.access_log) carries, as keys of its own.
ACCESS_KEYS = ("method", "path", "status", "duration_ms")


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"}``, plus the context ids present on the
    record and the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in (*CONTEXT_KEYS, *ACCESS_KEYS):
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        # default=str: an id of an unexpected type must not lose the line.
        return json.dumps(entry, default=str)


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Log to stderr in ``log_format``; a no-op when the root logger is already set up, as
    :func:`logging.basicConfig`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else
                         logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
