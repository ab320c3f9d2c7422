"""Descriptor-based confinement primitives, shared by every part of the plugin.

Paths a client names are walked one component at a time from a descriptor opened on the
workspace (``openat`` style, with ``O_NOFOLLOW``): the flags, the walk (``_open_parent``),
the errnos meaning "not a plain path" (``_confined_call``), the checks on client-given
names (including the names the server keeps for itself), small helpers that list, write
and unlink through a descriptor, and ``_finish_in_thread``, which never lets a cancelled
request release a descriptor a thread is still using.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from controllers.errors import InvalidRequest

T = TypeVar("T")

MAX_COMPONENT_BYTES = 255
MAX_PATH_BYTES = 4096

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# No O_TRUNC here: the file is truncated only after fstat proves it is a regular file with a
# single link (a hard link planted by a job must not let us truncate or chown its target).
# O_NONBLOCK keeps a planted FIFO from hanging the open.
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# errnos meaning "this name does not lead to a plain file in a plain directory".
_NOT_CONFINABLE = {errno.ELOOP, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENXIO}

_FILE_MESSAGE = "Invalid file path specified {}"
_SYMLINK_MESSAGE = "Invalid symlink destination path specified {}"

# What the server keeps inside a workspace: job directories under ``.jobs/`` and its own
# temporary and state files, all named ``.uws*``. Those are server state, so no name a
# client gives may create or replace one (see _refuse_reserved).
_JOBS_DIR = ".jobs"
_RESERVED_PREFIX = ".uws"


def _strictly_inside(path: str, root: str) -> bool:
    """Whether absolute, normalised ``path`` lies below ``root`` (and is not ``root``)."""
    return path != root and os.path.commonpath([path, root]) == root


def _name_parts(name: str, template: str) -> list[str]:
    """The components of a client-given relative name, or InvalidRequest(template)."""
    invalid = InvalidRequest(template.format(name))
    if not name or name.startswith("/") or name.endswith("/") or "\0" in name:
        raise invalid
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot be a file name
        raise invalid from None
    if len(encoded) > MAX_PATH_BYTES:
        raise invalid
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if not parts or any(len(part.encode("utf-8")) > MAX_COMPONENT_BYTES for part in parts):
        raise invalid
    _refuse_reserved(parts, invalid)
    return parts


def _upload_name(filename: str) -> str:
    """The final component of a client-given upload name, or InvalidRequest."""
    path = filename.replace("\\", "/")
    name = path.rsplit("/", 1)[-1]
    invalid = InvalidRequest(_FILE_MESSAGE.format(filename))
    if name in ("", ".", "..") or "\0" in name:
        raise invalid
    try:
        too_long = len(name.encode("utf-8")) > MAX_COMPONENT_BYTES
    except UnicodeEncodeError:
        raise invalid from None
    if too_long:
        raise invalid
    # Both the name as given (``.jobs/1/x`` aims at a job's files even though only ``x``
    # would be written) and the name the file lands under (``a/.jobs``: ``.jobs``).
    _refuse_reserved([part for part in path.split("/") if part not in ("", ".")], invalid)
    _refuse_reserved([name], invalid)
    return name


def _refuse_reserved(parts: Sequence[str], invalid: InvalidRequest) -> None:
    """Raise ``invalid`` if a client-given name would create or replace server state: a
    first component ``.jobs`` or any component starting with ``.uws``. The one check for
    every write by client-given name (files, symlinks, uploads)."""
    if (parts and parts[0] == _JOBS_DIR) or any(p.startswith(_RESERVED_PREFIX) for p in parts):
        raise invalid


def _confined_call(message: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``func``; an errno meaning "not a plain path" becomes InvalidRequest(message)."""
    try:
        return func(*args, **kwargs)
    except OSError as exc:
        if exc.errno in _NOT_CONFINABLE:
            raise InvalidRequest(message) from exc
        raise


def _open_parent(ws_fd: int, dirs: list[str], owner: tuple[int, int] | None, message: str) -> int:
    """Walk (creating as needed) ``dirs`` below ``ws_fd`` without following any link.

    Returns a new fd on the last directory; the caller closes it."""
    fd = os.dup(ws_fd)
    try:
        for part in dirs:
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
                created = True
            except FileExistsError:
                created = False
            sub = _confined_call(message, os.open, part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = sub
            if created and owner:
                os.fchown(fd, *owner)
        return fd
    except BaseException:
        os.close(fd)
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _list_dir(fd: int) -> Iterator[os.DirEntry[str]]:
    # Listed eagerly: the scandir iterator must not outlive this call, and entries keep
    # using ``fd`` (which the caller holds open) for their stat calls.
    with os.scandir(fd) as it:
        return iter(list(it))


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


async def _finish_in_thread(
    call: Callable[[], T], *, discard: Callable[[T], None] | None = None
) -> T:
    """Run ``call`` in a thread; if cancelled meanwhile, still wait for it to end.

    Otherwise a cancelled upload could close (or unlink) a descriptor or file the thread is
    still about to use. ``discard`` releases what a call finished after all (a new fd)."""
    task = asyncio.ensure_future(asyncio.to_thread(call))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                continue
        if discard and not task.cancelled() and task.exception() is None:
            discard(task.result())
        raise
