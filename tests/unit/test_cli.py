"""The ``uws`` command as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _uws(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, cwd=ROOT, timeout=120)


def test_create_client_token_prints_only_the_key(database_url: str, tmp_path: Path) -> None:
    env = {"UWS_DATABASE_URL": database_url, "UWS_DATA_DIR": str(tmp_path)}
    first = _uws("create-client-token", "portal-cli", env=env)
    assert first.returncode == 0, first.stderr
    assert re.fullmatch(r"[0-9a-f]{40}\n", first.stdout)
    again = _uws("create-client-token", "portal-cli", env=env)
    assert again.stdout == first.stdout  # the same client keeps its key


def test_help_lists_every_command() -> None:
    out = _uws("--help", env={}).stdout
    for command in ("dev", "api", "worker", "migrate", "create-client-token"):
        assert command in out
