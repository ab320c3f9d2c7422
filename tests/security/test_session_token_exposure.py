"""Attack from outside the session: whoever can read Temporal's histories or any process's
command line looks there for a running session's Jupyter token."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import eventually, make_user_token
from tests.security.attacker import start_lab, stop_job


def _decoded_payloads(node: Any) -> Iterator[bytes]:
    """Every ``data`` field of a history's JSON, base64-decoded (payloads are base64)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "data" and isinstance(value, str):
                with contextlib.suppress(binascii.Error, ValueError):
                    yield base64.b64decode(value, validate=True)
            yield from _decoded_payloads(value)
    elif isinstance(node, list):
        for item in node:
            yield from _decoded_payloads(item)


def _command_lines() -> Iterator[bytes]:
    """Every process's command line, as any account may read it from /proc."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                yield Path(f"/proc/{entry}/cmdline").read_bytes()


@pytest.mark.slow
async def test_session_token_is_in_no_history_nor_command_line(
    client, api_client_key, data_dir: Path, server_url: str, temporal_env
) -> None:
    """Whoever can read Temporal's histories (its UI, an operator, a replay file)
    or any process's command line (every account, through /proc) looks there for a
    session's Jupyter token, which opens the session without the owner's sign-in."""
    auth = {"UWS-Authorization": f"Token {await make_user_token(client, api_client_key)}"}
    lab = await start_lab(client, auth, data_dir, server_url)
    try:
        assert re.fullmatch(r"[0-9a-f]{16,128}", lab.token)
        token = lab.token.encode()
        assert not [line for line in _command_lines() if token in line]
        assert token not in (lab.workdir / "job.sh").read_bytes()
    finally:
        done = await stop_job(client, auth, lab.job_id)
    assert done["status"] == "complete", done

    handle = temporal_env.client.get_workflow_handle(f"job-{lab.job_id}")

    async def closed() -> bool:
        return (await handle.describe()).status.name != "RUNNING"

    await eventually(closed, timeout=60, interval=0.5)
    history = await handle.fetch_history()
    text = history.to_json()
    assert lab.token not in text
    payloads = list(_decoded_payloads(json.loads(text)))
    assert payloads  # the history does carry payloads: we looked inside them
    for payload in payloads:
        assert token not in payload
        assert lab.token not in payload.decode("utf-8", errors="replace")
