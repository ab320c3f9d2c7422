"""Symlink sources resolved with the workspace owner's view of the file system, never root's.

In-process when the server already is (or cannot become) the owner; otherwise in a short
child process that drops to the owner's identity before touching any path.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from typing import Any

from controllers.base import ExternalAccount
from controllers.errors import BackendError

# Resolving symlink sources. ``resolve`` maps absolute paths to ["ok", real path] (the
# target exists), ["missing", real path] (a component does not exist) or ["denied", ""]
# (cannot be resolved: permission denied, a loop, ...). One source for both places it
# runs: in-process, and in a child that first drops to the workspace owner's identity.
_RESOLVE_SOURCE = """
def resolve(paths):
    import os
    out = []
    for path in paths:
        try:
            out.append(["ok", os.path.realpath(path, strict=True)])
        except (FileNotFoundError, NotADirectoryError):
            out.append(["missing", os.path.realpath(path)])
        except OSError:
            out.append(["denied", ""])
    return out
"""
# The child is started as root and drops itself before touching any path (setpriv would
# exec the interpreter as the owner, who may not reach it: a venv or pyenv under a 0700
# home). The identity is checked after the switch; anything but exit 0 is a failure.
_RESOLVE_CHILD = _RESOLVE_SOURCE + """
import json, os, sys
request = json.load(sys.stdin)
uid, gid = request["uid"], request["gid"]
os.setgroups(request["groups"])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
    sys.exit(3)
json.dump(resolve(request["paths"]), sys.stdout)
"""
_RESOLVE_TIMEOUT_S = 10.0
_resolver: dict[str, Any] = {}
exec(_RESOLVE_SOURCE, _resolver)  # a constant of this module, never client input


def _resolve_as(account: ExternalAccount, paths: list[str]) -> list[tuple[str, str]]:
    """``resolve`` (see _RESOLVE_SOURCE) of each path, done with the file-system view of
    the account that owns the workspace: a source the owner cannot reach is as good as
    outside, whatever root (the server) could see.

    In-process when we already are that account, or cannot become it (not root; or an
    account without a uid, whose jobs run as the server itself too); otherwise in a short
    child process (never ``os.fork``: this process runs threads)."""
    identity = _identity_of(account)
    if identity is None:
        return [(state, real) for state, real in _resolver["resolve"](paths)]
    uid, gid, groups = identity
    request = json.dumps({"uid": uid, "gid": gid, "groups": groups, "paths": paths})
    argv = [sys.executable, "-I", "-S", "-X", "utf8", "-c", _RESOLVE_CHILD]
    try:
        proc = subprocess.run(
            argv, input=request.encode(), capture_output=True, cwd="/", env={},
            timeout=_RESOLVE_TIMEOUT_S, check=False,
        )
        answer = json.loads(proc.stdout) if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise _resolve_failed(uid, str(exc)) from exc
    if not _well_formed(answer, len(paths)):
        stderr = proc.stderr.decode(errors="replace")[-500:]
        raise _resolve_failed(uid, f"exit {proc.returncode}, stderr {stderr!r}")
    return [(state, real) for state, real in answer]


def _well_formed(answer: Any, count: int) -> bool:
    """Whether the child's answer is one [state, path] pair per path asked about."""
    return (
        isinstance(answer, list)
        and len(answer) == count
        and all(
            isinstance(item, list)
            and len(item) == 2
            and item[0] in ("ok", "missing", "denied")
            and isinstance(item[1], str)
            for item in answer
        )
    )


def _resolve_failed(uid: int, detail: str) -> BackendError:
    # Not the source's fault (the child itself failed): a 500, the same for every source.
    return BackendError(
        "The symlink sources could not be checked.",
        log_message=f"Resolving symlink sources as uid {uid} failed: {detail}",
    )


def _identity_of(account: ExternalAccount) -> tuple[int, int, list[int]] | None:
    """(uid, gid, supplementary groups) to resolve as, or None for "as we are"."""
    uid = account.uid
    euid = os.geteuid()
    if uid is None or euid != 0 or uid == euid:
        return None
    try:
        entry: pwd.struct_passwd | None = pwd.getpwuid(uid)
    except KeyError:
        entry = None  # a uid without a passwd entry: no supplementary groups to find
    gid = account.gid
    if gid is None:
        gid = entry.pw_gid if entry else uid
    groups = os.getgrouplist(entry.pw_name, gid) if entry else [gid]
    return uid, gid, groups
