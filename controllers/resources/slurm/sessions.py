"""Where a Slurm job's interactive session listens: a Unix socket the server chose.

The isolation model reaches sessions through a Unix socket in a directory only the job's
account and the service can open (``<sessions_dir>/<job id>/``, 0700, the owner's), and
the relay checks the socket's owner before connecting. A Unix socket is a kernel object of
one machine, so this holds where the compute node is the server's machine (a single-node
cluster, or the API and worker on the node itself) with ``sessions_dir`` on a filesystem
both see. The socket's path and owner are decided here before submission and kept by the
server; the job only binds the name it is given. The token is written by the server into
the directory, for the job to read: it never appears on a command line or in a history.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
from pathlib import Path

from controllers.base import ExternalAccount, SessionEndpoint
from controllers.errors import BackendError
from controllers.resources.session_dir import SESSION_SOCKET, SESSION_TOKEN, make_session_dir

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# A Unix socket's path must fit sockaddr_un (108 bytes with its NUL).
MAX_SOCKET_PATH = 107


def owner_uid_gid(account: ExternalAccount) -> tuple[int, int]:
    """The account Slurm runs the job as (it submits as ``account.username``); never root.
    The OS's answer wins over a stored uid: that is whose processes will bind the socket."""
    try:
        entry = pwd.getpwnam(account.username)
        uid, gid = entry.pw_uid, entry.pw_gid
    except KeyError:
        uid, gid = account.uid, account.gid
    if uid is None or gid is None or uid == 0:
        raise BackendError("The session cannot run: its owner has no account of their own.",
                           log_message=f"no usable uid for {account.username!r}: {uid}")
    return uid, gid


class SessionDirs:
    """The sessions' directories under one root (the service's, 0711)."""

    def __init__(self, root: str, hostname: str) -> None:
        self.root = Path(root)
        self.hostname = hostname

    def check(self) -> None:
        longest = len(str(self.root / ("9" * 12) / SESSION_SOCKET))
        if longest > MAX_SOCKET_PATH:
            raise RuntimeError(f"sessions_dir {self.root} is too long for a Unix socket path "
                               f"({longest} > {MAX_SOCKET_PATH} bytes)")

    def endpoint(self, job_id: int, account: ExternalAccount) -> SessionEndpoint:
        directory = self.root / str(job_id)
        return SessionEndpoint(socket_path=str(directory / SESSION_SOCKET),
                               token_file=str(directory / SESSION_TOKEN),
                               owner_uid=owner_uid_gid(account)[0], hostname=self.hostname)

    def make(self, job_id: int, account: ExternalAccount) -> None:
        uid, gid = owner_uid_gid(account)
        self._ensure_root()
        make_session_dir(self.root / str(job_id), uid, gid)

    def remove(self, job_id: int) -> None:
        shutil.rmtree(self.root / str(job_id), ignore_errors=True)

    def _ensure_root(self) -> None:
        self.root.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.root, 0o711)
        fd = os.open(self.root, _DIR)
        try:
            os.fchmod(fd, 0o711)  # traversable: each session's own directory is 0700
        finally:
            os.close(fd)
