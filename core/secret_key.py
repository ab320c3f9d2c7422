"""The server's signing key: ``UWS_SECRET_KEY``, else one generated once under
``UWS_DATA_DIR`` (shared by every process on this machine; set the variable when API
processes run on several machines)."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from core.settings import Settings


def load_secret_key(settings: Settings) -> bytes:
    if settings.secret_key:
        return settings.secret_key.encode()
    path = Path(settings.data_dir) / "secret_key"
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path.read_text().strip().encode()
