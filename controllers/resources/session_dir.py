"""A session's directory on the server: where an interactive job listens (a Unix socket)
and the token the server made for it, in one place for every resource that runs sessions
on this machine's filesystem (local, and Slurm on a node that shares it)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from pathlib import Path

SESSION_SOCKET, SESSION_TOKEN = "session.sock", "token"
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TOKEN = re.compile(rb"[0-9a-f]{48}")  # what make_session_dir writes


def make_session_dir(directory: Path, uid: int, gid: int) -> None:
    """A 0700 ``directory`` holding a new token, handed to ``uid``/``gid`` only once
    everything in it is written. One already complete is kept: a prepare run again after
    its job was launched (a workflow task retried once its worker died) must not pull the
    socket and the token from under the running session. Anything else there is removed
    first, so a prepare cut short starts clean. The token is written through the
    directory's descriptor, never by a name a job could have swapped."""
    if _complete(directory, uid):
        return
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


def _complete(directory: Path, uid: int) -> bool:
    """Whether ``directory`` is a finished session directory of ``uid``: its own, 0700,
    with a token file of its own (read without following links)."""
    try:
        dir_fd = os.open(directory, _DIR)
    except OSError:
        return False
    try:
        info = os.fstat(dir_fd)
        if info.st_uid != uid or stat.S_IMODE(info.st_mode) != 0o700:
            return False
        fd = os.open(SESSION_TOKEN, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
        try:
            token_info = os.fstat(fd)
            token = os.read(fd, 256)
        finally:
            os.close(fd)
    except OSError:
        return False
    finally:
        os.close(dir_fd)
    return (stat.S_ISREG(token_info.st_mode) and token_info.st_uid == uid
            and _TOKEN.fullmatch(token) is not None)
