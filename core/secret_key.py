"""The server's signing key: ``UWS_SECRET_KEY`` (or the file ``UWS_SECRET_KEY_FILE``
names, read by ``core.settings``), else one generated once under ``UWS_DATA_DIR`` (shared
by every process on this machine; set one of the variables when API processes run on
several machines)."""

from __future__ import annotations

import secrets
from pathlib import Path

from core.data_dir import prepare_data_dir, private_token
from core.settings import Settings


def load_secret_key(settings: Settings) -> bytes:
    if settings.secret_key:
        return settings.secret_key.encode()
    # Jobs run as other accounts on this machine: the data dir 0711 and the key 0600
    # (also when an earlier version left it readable), so that none of them can sign.
    data_dir = prepare_data_dir(Path(settings.data_dir))
    key, _ = private_token(data_dir / "secret_key", lambda: secrets.token_hex(32))
    return key.encode()
