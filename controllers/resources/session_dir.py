"""A session's directory on the server: where an interactive job listens (a Unix socket)
and the token the server made for it, in one place for every resource that runs sessions
on this machine's filesystem (local, and Slurm on a node that shares it)."""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path

SESSION_SOCKET, SESSION_TOKEN = "session.sock", "token"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def make_session_dir(directory: Path, uid: int, gid: int) -> None:
    """A fresh 0700 ``directory`` holding a new token, handed to ``uid``/``gid`` only once
    everything in it is written (a retried prepare starts clean). The token is written
    through the directory's descriptor, never by a name a job could have swapped."""
    shutil.rmtree(directory, ignore_errors=True)
    os.mkdir(directory, 0o700)
    dir_fd = os.open(directory, _DIR)
    try:
        fd = os.open(SESSION_TOKEN, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                     | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(24))
            if uid != os.geteuid():
                os.fchown(f.fileno(), uid, gid)
        if uid != os.geteuid():
            os.fchown(dir_fd, uid, gid)
    finally:
        os.close(dir_fd)
