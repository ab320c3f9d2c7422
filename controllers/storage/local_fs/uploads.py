"""Uploads: streamed into the server's staging directory beside the workspace, then moved
onto their final name in the workspace (committed) or removed (discarded).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial

from controllers.base import StagedUpload
from controllers.errors import BackendError, InsufficientStorage, InvalidRequest, PayloadTooLarge
from controllers.storage.local_fs.confinement import (
    _DIR_FLAGS,
    _FILE_MESSAGE,
    _TEMP_FLAGS,
    _confined_call,
    _finish_in_thread,
    _list_dir,
    _unlink_quietly,
    _upload_name,
    _write_all,
)

# errnos meaning "the file system (or the account's quota on it) is full".
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
# Uploads in progress, beside the workspaces of a user (see open_staging).
_STAGING_DIR = ".uws-staging"
STAGED_MAX_AGE_SECONDS = 86400


async def stage_upload(
    path: str,
    filename: str,
    chunks: AsyncIterator[bytes],
    limit: int | None,
    owner: tuple[int, int] | None,
    open_workspace: Callable[[], int],
    open_staging: Callable[[], int],
) -> StagedUpload:
    """Receive ``chunks`` (at most ``limit`` bytes) into a new file of the staging directory
    (``open_staging``), to be placed as ``filename`` in the workspace at ``path``
    (``open_workspace``)."""
    name = _upload_name(filename)
    ws_fd = await _finish_in_thread(open_workspace, discard=os.close)
    staging_fd: int | None = None
    temp = f".uws-upload-{secrets.token_hex(16)}.part"
    fd: int | None = None
    try:
        # Fail fast, before receiving the body, when the name cannot be written.
        await _finish_in_thread(partial(_check_upload_target, ws_fd, name, filename))
        staging_fd = await _finish_in_thread(open_staging, discard=os.close)
        fd = await _finish_in_thread(
            partial(os.open, temp, _TEMP_FLAGS, 0o600, dir_fd=staging_fd), discard=os.close
        )
        size = 0
        async for chunk in chunks:
            size += len(chunk)
            if limit is not None and size > limit:
                raise PayloadTooLarge(f"Upload exceeds the limit of {limit} bytes.")
            await _finish_in_thread(partial(_write_all, fd, chunk))
        # _seal_upload closes the fd whatever happens; never close it twice.
        handed_over, fd = fd, None
        await _finish_in_thread(partial(_seal_upload, handed_over, owner))
    except BaseException as exc:
        # Synchronous on purpose: this also runs on cancellation, where awaiting again
        # could be interrupted. Each call is a single quick syscall.
        if fd is not None:
            os.close(fd)
        if staging_fd is not None:
            _unlink_quietly(temp, staging_fd)
            os.close(staging_fd)
        os.close(ws_fd)
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            raise InsufficientStorage(
                "Not enough space left on the storage to save this upload.",
                log_message=f"upload of {filename!r} into {path}: {exc}",
            ) from exc
        raise
    return StagedUpload(filename, size, _Staged(ws_fd, staging_fd, temp, name))


async def commit_uploads(staged: list[StagedUpload]) -> None:
    for item in staged:
        handle: _Staged = item.handle
        try:
            await _finish_in_thread(partial(
                _place_upload, handle.staging_fd, handle.ws_fd, handle.temp, handle.name,
                item.filename))
        except OSError as exc:
            raise BackendError(
                "The upload could not be moved into the workspace.",
                log_message=f"Placing {item.filename!r} failed: {exc}",
            ) from exc
        handle.committed = True


def discard_uploads(staged: list[StagedUpload]) -> None:
    for item in staged:
        handle: _Staged = item.handle
        if handle.ws_fd < 0:
            continue
        if not handle.committed:
            _unlink_quietly(handle.temp, handle.staging_fd)
        os.close(handle.staging_fd)
        os.close(handle.ws_fd)
        handle.ws_fd = handle.staging_fd = -1


def open_staging(workspace: str) -> int:
    """The server's own directory beside the workspace, in the server-owned per-user
    directory (0700, created on first use): uploads stream in there, out of every
    scan's and every job's reach, so a scan meanwhile never counts (nor a job ever
    sees) a file still arriving; the quota counts it through its claim instead. Files
    a crashed request left there are removed after a day."""
    parent = os.path.dirname(workspace)
    parent_fd = os.open(parent, _DIR_FLAGS)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(_STAGING_DIR, 0o700, dir_fd=parent_fd)
        fd = os.open(_STAGING_DIR, _DIR_FLAGS, dir_fd=parent_fd)
    finally:
        os.close(parent_fd)
    _remove_old_staged(fd)
    return fd


def _check_upload_target(ws_fd: int, name: str, filename: str) -> None:
    """Refuse an upload whose final name is a symlink or a directory."""
    try:
        st = os.stat(name, dir_fd=ws_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
        raise InvalidRequest(_FILE_MESSAGE.format(filename))


@dataclass
class _Staged:
    """A staged upload: its temporary name in ``staging_fd``, its final one in ``ws_fd``."""

    ws_fd: int
    staging_fd: int
    temp: str
    name: str
    committed: bool = False


def _remove_old_staged(staging_fd: int) -> None:
    cutoff = time.time() - STAGED_MAX_AGE_SECONDS
    for entry in _list_dir(staging_fd):
        try:
            if entry.is_file(follow_symlinks=False) and \
                    entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.name, dir_fd=staging_fd)
        except FileNotFoundError:
            continue


def _seal_upload(fd: int, owner: tuple[int, int] | None) -> None:
    """Set mode and owner of the received temporary file, and close it."""
    try:
        os.fchmod(fd, 0o644)
        if owner:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)


def _place_upload(staging_fd: int, ws_fd: int, temp: str, name: str, filename: str) -> None:
    """Move the temporary file onto its final name in the workspace."""
    # Checked again: the name may have changed while the body streamed in. rename() itself
    # never follows a link, so a race after this check cannot escape the workspace.
    _check_upload_target(ws_fd, name, filename)
    _confined_call(
        _FILE_MESSAGE.format(filename),
        os.replace,
        temp,
        name,
        src_dir_fd=staging_fd,
        dst_dir_fd=ws_fd,
    )
