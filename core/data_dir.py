"""The server's data directory (``UWS_DATA_DIR``) and the private files kept in it.

Jobs run as ordinary OS accounts on the same machine, so nothing the server keeps here is
for them: the directory is 0711 (they traverse it to their workspaces but cannot list it),
the server's files 0600 and PostgreSQL's directory 0700.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

# Server state directly under the data dir; everything else there (workspaces/, sessions/)
# belongs to the code that makes it.
_PRIVATE_FILES = (
    "secret_key", "postgres-password", "postgres.lock", "temporal.log",
    "temporal.sqlite", "temporal.sqlite-wal", "temporal.sqlite-shm", "temporal.sqlite-journal",
)


def set_mode(path: Path, mode: int) -> None:
    """chmod ``path`` unless it is a symlink (never follow one out of the data dir)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)


def prepare_data_dir(path: Path) -> Path:
    """Create ``path`` if needed and give it and the server state in it their modes:
    the dir 0711, ``postgres/`` 0700, the server's files 0600 (also when an earlier
    version left them readable)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    set_mode(path, 0o711)
    set_mode(path / "postgres", 0o700)
    for name in _PRIVATE_FILES:
        set_mode(path / name, 0o600)
    return path


def private_token(path: Path, generate: Callable[[], str]) -> tuple[str, bool]:
    """The token kept in ``path`` (mode 0600) and whether this call created it, with
    ``generate()``. Concurrent first calls agree on one token: it is written to an O_EXCL
    temporary file and published with link(), which fails if another got there first."""
    created = False
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(generate())
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
                created = True
        finally:
            os.unlink(tmp)
    set_mode(path, 0o600)
    token = path.read_text().strip()
    if not token:
        raise RuntimeError(f"{path} is empty: remove it to have a new one generated")
    return token, created


# --- the embedded PostgreSQL ---------------------------------------------------------
