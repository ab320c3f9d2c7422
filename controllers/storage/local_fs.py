"""Workspaces as directories on a local (or locally mounted) file system.

Layout: ``<root_dir>/<username>/<workspace_id>``. The per-user directory stays owned by the
server so a user cannot swap a workspace directory for a symlink; the workspace itself is
owned by the user's account.

Confinement does not rely on string checks alone: every path a client names is walked one
component at a time from a descriptor opened on the workspace (``openat`` style, with
``O_NOFOLLOW``), so a symlink planted by a job inside the workspace -- even between a check
and a write -- can never redirect a write outside of it. Scans walk descriptors the same way
and never follow links.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import shutil
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any, TypeVar

from pydantic import Field

from controllers.base import (
    ExternalAccount,
    FileSpec,
    Health,
    PluginSettings,
    StorageMethod,
    SymlinkSpec,
    WorkspaceScan,
)
from controllers.errors import BackendError, InvalidRequest, PayloadTooLarge

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


class LocalFileSystemStorage(StorageMethod):
    """Stores each workspace as a directory under ``root_dir``."""

    class Settings(PluginSettings):
        root_dir: str
        allowed_symlink_sources: list[str] = Field(default_factory=list)
        set_ownership: bool = True
        max_upload_bytes: int | None = Field(default=None, ge=0)

    settings: Settings

    def __init__(self, name: str, settings: Settings) -> None:
        super().__init__(name, settings)
        self.root_dir = os.path.normpath(os.path.abspath(settings.root_dir))
        self._real_root = os.path.realpath(self.root_dir)
        self._allowed_sources = [os.path.realpath(p) for p in settings.allowed_symlink_sources]

    # --- paths ----------------------------------------------------------------------------

    def workspace_path(self, account: ExternalAccount, workspace_id: int) -> str:
        username = account.username
        if username in ("", ".", "..") or "/" in username or "\0" in username:
            raise BackendError(
                "The account's username cannot name a directory.",
                log_message=f"Unusable account username {username!r}",
            )
        return os.path.join(self.root_dir, username, str(workspace_id))

    def _confined(self, path: str) -> str:
        """``path`` normalised, or BackendError unless it lies strictly inside the root.

        Checked both lexically and with links resolved, so neither ``..`` nor a symlinked
        parent can aim a create or a delete at the root or outside it."""
        norm = os.path.normpath(os.path.abspath(path))
        if not (
            _strictly_inside(norm, self.root_dir)
            and _strictly_inside(os.path.realpath(norm), self._real_root)
        ):
            raise BackendError(
                "Workspace path is not inside the storage root.",
                log_message=f"Workspace path {path!r} is not inside {self.root_dir!r}",
            )
        return norm

    def _open_workspace(self, path: str) -> int:
        try:
            return os.open(self._confined(path), _DIR_FLAGS)
        except OSError as exc:
            raise BackendError(
                "The workspace directory cannot be opened.",
                log_message=f"Cannot open workspace {path!r}: {exc}",
            ) from exc

    def _owner(self, account: ExternalAccount) -> tuple[int, int] | None:
        """(uid, gid) to chown to, or None when ownership needs no change."""
        if not self.settings.set_ownership or account.uid is None:
            return None
        if account.uid == os.geteuid():
            return None
        return account.uid, -1 if account.gid is None else account.gid

    # --- workspaces -----------------------------------------------------------------------

    async def create_workspace(self, path: str, account: ExternalAccount) -> None:
        await asyncio.to_thread(self._create_workspace, path, account)

    def _create_workspace(self, path: str, account: ExternalAccount) -> None:
        path = self._confined(path)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError as exc:
            # Ids are never reused: an existing directory means something is wrong.
            raise BackendError(
                "The workspace directory already exists.",
                log_message=f"Workspace directory {path!r} already exists",
            ) from exc
        fd = os.open(path, _DIR_FLAGS)
        try:
            os.fchmod(fd, 0o700)  # the umask may have narrowed it; make it exact
            if owner := self._owner(account):
                os.fchown(fd, *owner)
        finally:
            os.close(fd)

    async def delete_workspace(self, path: str) -> None:
        await asyncio.to_thread(self._delete_workspace, path)

    def _delete_workspace(self, path: str) -> None:
        path = self._confined(path)
        try:
            shutil.rmtree(path)  # fd-based on Linux: never follows links it finds
        except FileNotFoundError:
            return
        except OSError as exc:
            raise BackendError(
                "The workspace directory could not be deleted.",
                log_message=f"Cannot delete workspace {path!r}: {exc}",
            ) from exc

    # --- files and symlinks -----------------------------------------------------------------

    async def validate_files(self, files: list[FileSpec], symlinks: list[SymlinkSpec]) -> None:
        # Thread: checking an allowed symlink source resolves links on disk.
        await asyncio.to_thread(self._validate_files, files, symlinks)

    def _validate_files(self, files: list[FileSpec], symlinks: list[SymlinkSpec]) -> None:
        for file in files:
            if ".." in file.name:
                raise InvalidRequest("File name cannot contain double dots.")
            _name_parts(file.name, _FILE_MESSAGE)
        for link in symlinks:
            if ".." in link.name:
                raise InvalidRequest("Symlink name cannot contain double dots.")
            _name_parts(link.name, _SYMLINK_MESSAGE)
            if not self._source_allowed(link.source_path):
                raise InvalidRequest(f"Symlink source not allowed: {link.source_path}")

    def _source_allowed(self, source_path: str) -> bool:
        if not self._allowed_sources:
            return True
        # A relative source would resolve against the server's cwd, not anything meaningful.
        if "\0" in source_path or not os.path.isabs(source_path):
            return False
        real = os.path.realpath(source_path)
        return any(real == root or _strictly_inside(real, root) for root in self._allowed_sources)

    async def write_files(
        self,
        path: str,
        account: ExternalAccount,
        files: list[FileSpec],
        symlinks: list[SymlinkSpec],
    ) -> None:
        await self.validate_files(files, symlinks)
        await asyncio.to_thread(self._write_files, path, account, files, symlinks)

    def _write_files(
        self,
        path: str,
        account: ExternalAccount,
        files: list[FileSpec],
        symlinks: list[SymlinkSpec],
    ) -> None:
        # Sources are checked before anything is written, so a bad one leaves no half-write.
        for link in symlinks:
            if not os.path.exists(link.source_path):
                raise BackendError(f"Symlink path not found: {link.source_path}")
        owner = self._owner(account)
        ws_fd = self._open_workspace(path)
        try:
            for file in files:
                self._write_file(ws_fd, file, owner)
            for link in symlinks:
                self._make_symlink(ws_fd, link, owner)
        except OSError as exc:
            raise BackendError(
                "The files could not be written to the workspace.",
                log_message=f"Writing into {path!r} failed: {exc}",
            ) from exc
        finally:
            os.close(ws_fd)

    def _write_file(self, ws_fd: int, file: FileSpec, owner: tuple[int, int] | None) -> None:
        message = _FILE_MESSAGE.format(file.name)
        parts = _name_parts(file.name, _FILE_MESSAGE)
        parent = _open_parent(ws_fd, parts[:-1], owner, message)
        try:
            fd = _confined_call(message, os.open, parts[-1], _FILE_FLAGS, 0o644, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
                raise InvalidRequest(message)
            os.ftruncate(fd, 0)
            _write_all(fd, file.content.encode("utf-8"))
            if owner:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)

    def _make_symlink(self, ws_fd: int, link: SymlinkSpec, owner: tuple[int, int] | None) -> None:
        message = _SYMLINK_MESSAGE.format(link.name)
        parts = _name_parts(link.name, _SYMLINK_MESSAGE)
        name = parts[-1]
        parent = _open_parent(ws_fd, parts[:-1], owner, message)
        try:
            try:
                os.symlink(link.source_path, name, dir_fd=parent)
            except FileExistsError:
                # Only a symlink may be replaced; swap atomically via a temporary link.
                existing = os.stat(name, dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISLNK(existing.st_mode):
                    raise InvalidRequest(message) from None
                temp = f".uws-link-{secrets.token_hex(8)}"
                os.symlink(link.source_path, temp, dir_fd=parent)
                try:
                    _confined_call(
                        message, os.replace, temp, name, src_dir_fd=parent, dst_dir_fd=parent
                    )
                except BaseException:
                    _unlink_quietly(temp, parent)
                    raise
            if owner:
                os.chown(name, *owner, dir_fd=parent, follow_symlinks=False)  # lchown
        finally:
            os.close(parent)

    # --- uploads ----------------------------------------------------------------------------

    async def save_upload(
        self,
        path: str,
        account: ExternalAccount,
        filename: str,
        chunks: AsyncIterator[bytes],
    ) -> int:
        name = _upload_name(filename)
        limit = self.settings.max_upload_bytes
        owner = self._owner(account)
        ws_fd = await _finish_in_thread(partial(self._open_workspace, path), discard=os.close)
        temp = f".uws-upload-{secrets.token_hex(16)}.part"
        fd: int | None = None
        try:
            # Fail fast, before receiving the body, when the name cannot be written.
            await _finish_in_thread(partial(_check_upload_target, ws_fd, name, filename))
            fd = await _finish_in_thread(
                partial(os.open, temp, _TEMP_FLAGS, 0o600, dir_fd=ws_fd), discard=os.close
            )
            size = 0
            async for chunk in chunks:
                size += len(chunk)
                if limit is not None and size > limit:
                    raise PayloadTooLarge(f"Upload exceeds the limit of {limit} bytes.")
                await _finish_in_thread(partial(_write_all, fd, chunk))
            # _finish_upload closes the fd whatever happens; never close it twice.
            handed_over, fd = fd, None
            await _finish_in_thread(
                partial(_finish_upload, handed_over, ws_fd, temp, name, filename, owner)
            )
            return size
        except BaseException:
            # Synchronous on purpose: this also runs on cancellation, where awaiting again
            # could be interrupted. Both calls are single quick syscalls.
            if fd is not None:
                os.close(fd)
            _unlink_quietly(temp, ws_fd)
            raise
        finally:
            os.close(ws_fd)

    # --- scan and health --------------------------------------------------------------------

    async def scan(self, path: str) -> WorkspaceScan:
        return await asyncio.to_thread(self._scan, path)

    def _scan(self, path: str) -> WorkspaceScan:
        try:
            top = os.open(self._confined(path), _DIR_FLAGS)
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

    async def prepare(self) -> None:
        await asyncio.to_thread(os.makedirs, self.root_dir, 0o755, True)

    async def health(self) -> Health:
        return await asyncio.to_thread(self._health)

    def _health(self) -> Health:
        root = self.root_dir
        if not os.path.isdir(root):
            return Health(ok=False, detail=f"storage root {root} does not exist")
        if not os.access(root, os.W_OK | os.X_OK):
            return Health(ok=False, detail=f"storage root {root} is not writable")
        return Health(ok=True, detail=f"storage root {root} is writable")


# --- helpers --------------------------------------------------------------------------------


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
    return parts


def _upload_name(filename: str) -> str:
    """The final component of a client-given upload name, or InvalidRequest."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    invalid = InvalidRequest(_FILE_MESSAGE.format(filename))
    if name in ("", ".", "..") or "\0" in name:
        raise invalid
    try:
        too_long = len(name.encode("utf-8")) > MAX_COMPONENT_BYTES
    except UnicodeEncodeError:
        raise invalid from None
    if too_long:
        raise invalid
    return name


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


def _check_upload_target(ws_fd: int, name: str, filename: str) -> None:
    """Refuse an upload whose final name is a symlink or a directory."""
    try:
        st = os.stat(name, dir_fd=ws_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode) or stat.S_ISDIR(st.st_mode):
        raise InvalidRequest(_FILE_MESSAGE.format(filename))


def _finish_upload(
    fd: int, ws_fd: int, temp: str, name: str, filename: str, owner: tuple[int, int] | None
) -> None:
    """Set mode and owner, close, and move the temporary file onto its final name."""
    try:
        os.fchmod(fd, 0o644)
        if owner:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)
    # Checked again: the name may have changed while the body streamed in. rename() itself
    # never follows a link, so a race after this check cannot escape the workspace.
    _check_upload_target(ws_fd, name, filename)
    _confined_call(
        _FILE_MESSAGE.format(filename),
        os.replace,
        temp,
        name,
        src_dir_fd=ws_fd,
        dst_dir_fd=ws_fd,
    )


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
