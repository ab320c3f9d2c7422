"""The ``LocalFileSystemStorage`` plugin: its settings, its paths and the ``StorageMethod``
contract (see the package docstring for the layout and the confinement rules).

Workspaces are created and deleted here, and client-named files and symlinks written
through the confinement primitives; uploads, the workspace copy and the scan are done by
the modules beside this one.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import stat
from collections.abc import AsyncIterator, Callable
from functools import partial

from pydantic import Field

from controllers.base import (
    CopyProgress,
    ExternalAccount,
    FileSpec,
    Health,
    PluginSettings,
    StagedUpload,
    StorageMethod,
    SymlinkSpec,
    WorkspaceScan,
)
from controllers.errors import BackendError, InvalidRequest
from controllers.storage.local_fs import copy_engine, uploads
from controllers.storage.local_fs.confinement import (
    _DIR_FLAGS,
    _FILE_FLAGS,
    _FILE_MESSAGE,
    _SYMLINK_MESSAGE,
    MAX_PATH_BYTES,
    _confined_call,
    _name_parts,
    _open_parent,
    _strictly_inside,
    _unlink_quietly,
    _write_all,
)
from controllers.storage.local_fs.scan import scan_workspace
from controllers.storage.local_fs.sources import _resolve_as

_SOURCE_MESSAGE = "Symlink source not allowed: {}"


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
        # Made now, not at the first upload, so uploads never change the user's directory.
        os.close(self._open_staging(path))
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
        # No disk access here (so no thread): sources are resolved by write_files, as the
        # workspace owner, before anything is written.
        self._validate_files(files, symlinks)

    def _validate_files(self, files: list[FileSpec], symlinks: list[SymlinkSpec]) -> None:
        for file in files:
            if ".." in file.name:
                raise InvalidRequest("File name cannot contain double dots.")
            _name_parts(file.name, _FILE_MESSAGE)
        for link in symlinks:
            if ".." in link.name:
                raise InvalidRequest("Symlink name cannot contain double dots.")
            _name_parts(link.name, _SYMLINK_MESSAGE)
            if not self._source_resolvable(link.source_path):
                raise InvalidRequest(_SOURCE_MESSAGE.format(link.source_path))

    def _source_resolvable(self, source_path: str) -> bool:
        """Whether a source could be allowed at all, judged from its text alone."""
        if not self._allowed_sources:
            return False  # no allowed roots: symlinks are off
        # A relative source would resolve against the server's cwd, not anything meaningful.
        if "\0" in source_path or not os.path.isabs(source_path):
            return False
        try:
            return len(os.fsencode(source_path)) <= MAX_PATH_BYTES
        except UnicodeEncodeError:  # lone surrogates name no file
            return False

    def _check_sources(self, account: ExternalAccount, symlinks: list[SymlinkSpec]) -> None:
        """Refuse any source that does not resolve, as ``account``, inside an allowed root.

        Outside, unresolvable by the owner, existing or not: one and the same 400, so the
        answer tells nothing about the server's files. Only inside an allowed root does a
        missing target get its own (the reference's) error."""
        if not symlinks:
            return
        resolved = _resolve_as(account, [link.source_path for link in symlinks])
        for link, (state, real) in zip(symlinks, resolved, strict=True):
            if state == "denied" or not any(
                real == root or _strictly_inside(real, root) for root in self._allowed_sources
            ):
                raise InvalidRequest(_SOURCE_MESSAGE.format(link.source_path))
            if state == "missing":
                raise BackendError(f"Symlink path not found: {link.source_path}")

    async def write_files(self, path: str, account: ExternalAccount, files: list[FileSpec],
                          symlinks: list[SymlinkSpec]) -> None:
        await self.validate_files(files, symlinks)
        await asyncio.to_thread(self._write_files, path, account, files, symlinks)

    def _write_files(self, path: str, account: ExternalAccount, files: list[FileSpec],
                     symlinks: list[SymlinkSpec]) -> None:
        # Sources are checked before anything is written, so a bad one leaves no half-write.
        self._check_sources(account, symlinks)
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

    async def stage_upload(self, path: str, account: ExternalAccount, filename: str,
                           chunks: AsyncIterator[bytes]) -> StagedUpload:
        return await uploads.stage_upload(
            path,
            filename,
            chunks,
            self.settings.max_upload_bytes,
            self._owner(account),
            partial(self._open_workspace, path),
            partial(self._open_staging, path),
        )

    async def commit_uploads(self, staged: list[StagedUpload]) -> None:
        await uploads.commit_uploads(staged)

    def discard_uploads(self, staged: list[StagedUpload]) -> None:
        uploads.discard_uploads(staged)

    def _open_staging(self, path: str) -> int:
        return uploads.open_staging(self._confined(path))

    # --- copying a workspace ---------------------------------------------------------------

    async def copy_workspace(
        self,
        source: str,
        target: str,
        account: ExternalAccount,
        resume_after: str = "",
        progress: Callable[[CopyProgress], None] | None = None,
    ) -> CopyProgress:
        """See ``StorageMethod.copy_workspace``. Semantics chosen here:

        * Order: depth-first, names sorted (``str`` order) in each directory, a directory
          before its contents; paths are relative (``a/b.txt``). An entry is a directory, a
          regular file or a symlink; dot-names and other file types are not entries.
        * ``resume_after`` found in the source (same path, not hidden, a directory, file or
          symlink): every entry up to and including it in that order is assumed done (not
          touched). Not found (the source changed, or a foreign value): the walk starts from
          the beginning. Either way, a file whose target already has the same size and mtime
          (or a symlink with the same text) is not copied again, and stale
          ``.uws-copy-*.part`` files are removed from every target directory revisited.
        * ``files_done`` / ``bytes_done``: regular files plus symlinks / bytes of regular
          files, for the whole workspace so far -- entries assumed done by ``resume_after``
          and entries found already identical count as well as those copied by this call.
          The returned value is the final total; ``last_path`` is the last entry of the walk.
        * ``progress`` is called on the event loop, once per entry after ``resume_after``,
          in walk order, never from a thread. The blocking work runs in
          ``asyncio.to_thread`` chunks (up to ``COPY_CHUNK_ENTRIES`` entries,
          ``COPY_CHUNK_BYTES`` of files; files copied ``COPY_THREADS`` at a time); once a
          chunk is entirely on disk its reports are delivered, so ``progress`` lags the
          disk by at most one chunk and is never ahead of it. If ``progress`` raises, the
          copy stops and the exception propagates; entries already on disk but not reported
          are found identical on resume. A cancelled copy first lets its chunk finish.
        * Permission bits (``0o777``) and mtimes of files, directories and symlinks (mtime
          only) are copied; set-id and sticky bits are not (a copy made for another account
          must not carry set-id bits its source's owner chose). Ownership: ``account``, per
          ``set_ownership``.
        """
        start = partial(
            copy_engine.start_copy, source, target, self._owner(account), resume_after,
            self._confined, self._open_workspace,
        )
        return await copy_engine.run_copy(start, progress)

    # --- scan and health --------------------------------------------------------------------

    async def scan(self, path: str) -> WorkspaceScan:
        return await asyncio.to_thread(scan_workspace, path, self._confined)

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
