"""Workspaces as directories on a local (or locally mounted) file system.

Layout: ``<root_dir>/<username>/<workspace_id>``. The per-user directory stays owned by the
server so a user cannot swap a workspace directory for a symlink; the workspace itself is
owned by the user's account.

Confinement does not rely on string checks alone: every path a client names is walked one
component at a time from a descriptor opened on the workspace (``openat`` style, with
``O_NOFOLLOW``), so a symlink planted by a job inside the workspace -- even between a check
and a write -- can never redirect a write outside of it. Scans walk descriptors the same way
and never follow links.

Symlinks a client asks for may only point into the operator's ``allowed_symlink_sources``
(none by default: symlinks are off). A source is resolved with the workspace owner's view
of the file system, never root's, and any source refused gets one and the same answer,
so the API is no oracle for which paths exist on the server. Names the server keeps for
itself inside a workspace (``.jobs/``, ``.uws*``) are never written by client name.

Modules: ``plugin`` (the plugin class and the ``StorageMethod`` contract), ``confinement``
(descriptor-based confinement primitives and name checks), ``sources`` (symlink sources
resolved as the workspace owner), ``uploads`` (staging, committing and discarding
uploads), ``copy_engine`` and ``copy_entries`` (the resumable workspace copy) and
``scan`` (the workspace scan).
"""

from controllers.storage.local_fs.plugin import LocalFileSystemStorage

__all__ = ["LocalFileSystemStorage"]
