"""``UWS_LOG_FORMAT=json``: one JSON object per log line."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from core.logging_setup import JsonFormatter, configure_logging
from core.settings import Settings
from tests.conftest import TEST_CONFIG


def _logger(stream: io.StringIO) -> logging.Logger:
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger(f"uws.test.json.{id(stream)}")
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def test_one_json_object_per_line_with_the_extra_ids() -> None:
    stream = io.StringIO()
    log = _logger(stream)
    log.warning("job %s stalled", 7, extra={"job_id": 7, "workspace_id": 3, "user_id": 11})
    log.info("plain\nmessage")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "job 7 stalled"
    assert first["level"] == "WARNING"
    assert first["logger"] == log.name
    assert first["time"].endswith("+00:00")
    assert (first["job_id"], first["workspace_id"], first["user_id"]) == (7, 3, 11)
    assert second["message"] == "plain\nmessage"
    assert not {"job_id", "workspace_id", "user_id"} & second.keys()


def test_tracebacks_stay_on_the_line() -> None:
    stream = io.StringIO()
    log = _logger(stream)
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"workspace_id": object()})
    (entry,) = (json.loads(line) for line in stream.getvalue().splitlines())
    assert "ValueError: boom" in entry["exc_info"]
    assert entry["workspace_id"].startswith("<object")  # unserialisable: its str()


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_configure_logging_picks_the_formatter(log_format: str) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers = []
    try:
        configure_logging(log_format)
        (handler,) = root.handlers
        assert isinstance(handler.formatter, JsonFormatter) == (log_format == "json")
    finally:
        root.handlers = saved[0]
        root.setLevel(saved[1])


def test_json_logs_keep_litestar_off_the_root_logger(tmp_path: Path) -> None:
    # Litestar's default logging config replaces the root handler: text mode keeps it,
    # JSON mode must not let it turn the API's lines back into text.
    from api.app import create_app
    from app.controllers import load_controllers

    def litestar(log_format: str) -> Any:
        settings = Settings(config=TEST_CONFIG, data_dir=tmp_path, log_format=log_format)
        return create_app(settings, controllers=load_controllers(settings)).app

    assert litestar("json").logging_config is None
    assert litestar("text").logging_config is not None
