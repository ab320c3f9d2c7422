"""The workspace scan: a depth-first walk over directory descriptors that never follows a
link, totalling the disk usage and listing the files and symlinks that are not hidden.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterator

from controllers.base import WorkspaceScan
from controllers.errors import BackendError
from controllers.storage.local_fs.confinement import _DIR_FLAGS, _list_dir


def scan_workspace(path: str, confined: Callable[[str], str]) -> WorkspaceScan:
    """What the workspace at ``path`` holds; ``confined`` checks the path first."""
    try:
        top = os.open(confined(path), _DIR_FLAGS)
    except FileNotFoundError:
        return WorkspaceScan(disk_space=0)
    except OSError as exc:
        raise BackendError(
            "The workspace directory cannot be read.",
            log_message=f"Cannot scan workspace {path!r}: {exc}",
        ) from exc
    files: list[str] = []
    links: list[str] = []
    size = 0
    # Depth-first with one open directory per level; each frame is
    # (dir fd, relative path, inside a dot-dir, remaining entries).
    stack: list[tuple[int, str, bool, Iterator[os.DirEntry[str]]]] = []
    try:
        stack.append((top, "", False, _list_dir(top)))
        while stack:
            fd, rel, hidden, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                os.close(fd)
                continue
            child = f"{rel}/{entry.name}"
            # Dot entries count towards disk usage but are never listed.
            child_hidden = hidden or entry.name.startswith(".")
            try:
                if entry.is_symlink():
                    if not child_hidden:
                        links.append(child)
                elif entry.is_file(follow_symlinks=False):
                    size += entry.stat(follow_symlinks=False).st_size
                    if not child_hidden:
                        files.append(child)
                elif entry.is_dir(follow_symlinks=False):
                    sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                    try:
                        sub_entries = _list_dir(sub)
                    except BaseException:
                        os.close(sub)
                        raise
                    stack.append((sub, child, child_hidden, sub_entries))
            except (FileNotFoundError, NotADirectoryError):
                continue  # changed under us (a running job): skip it
            except OSError as exc:
                if exc.errno != errno.ELOOP:  # replaced by a symlink meanwhile
                    raise
    except OSError as exc:
        raise BackendError(
            "The workspace directory cannot be read.",
            log_message=f"Cannot scan workspace {path!r}: {exc}",
        ) from exc
    finally:
        for fd, *_ in stack:
            os.close(fd)
    return WorkspaceScan(disk_space=size, files=sorted(files), symlinks=sorted(links))
