"""What ``/proc`` says of a process: enough to tell "still ours" from "a stranger now"."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path


def proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (index 0 is the state), or None if there is no such
    process. The command name (field 2) may hold spaces and parentheses, hence rpartition."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw.rpartition(")")[2].split()


def start_ticks(pid: int) -> int | None:
    """Field 22 (start time in clock ticks since boot): with the pid it names one process."""
    fields = proc_stat(pid)
    return int(fields[19]) if fields else None


def is_alive(pid: int, ticks: int | None) -> bool:
    """Whether ``pid`` is still the process we started, and not merely an unreaped zombie."""
    if pid <= 0 or ticks is None:
        return False
    fields = proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X") and int(fields[19]) == ticks


def kill_if_ours(pid: int, ticks: int | None, sig: signal.Signals) -> None:
    if is_alive(pid, ticks):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def kill_group_if_ours(pgid: int, ticks: int | None, sig: signal.Signals) -> None:
    """Signal the job's process group while its leader is still the process we started (a
    group id is never reused while any member lives, but the leader may be gone)."""
    if is_alive(pgid, ticks):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
