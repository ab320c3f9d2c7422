"""Validation of the ``workspace_details`` a client sends, with the contract's messages."""

from __future__ import annotations

from typing import Any

from api.errors import BadRequest
from controllers.base import FileSpec, SymlinkSpec


def parse_workspace_details(details: Any) -> tuple[list[FileSpec], list[SymlinkSpec]]:
    if details is None:
        return [], []
    if not isinstance(details, dict):
        raise BadRequest("Workspace details not JSON.")
    symlinks_raw = details.get("symlinks", [])
    files_raw = details.get("files", [])
    if not isinstance(symlinks_raw, list):
        raise BadRequest("'symlinks' index must contain a list.")
    if not isinstance(files_raw, list):
        raise BadRequest("'files' index must contain a list.")
    files = [_file(item) for item in files_raw]
    symlinks = [_symlink(item) for item in symlinks_raw]
    return files, symlinks


def _file(item: Any) -> FileSpec:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise BadRequest("Each file needs a 'name' string.")
    content = item.get("content", "")
    if not isinstance(content, str):
        raise BadRequest(f"The content of {item['name']} must be a string.")
    return FileSpec(name=item["name"], content=content)


def _symlink(item: Any) -> SymlinkSpec:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise BadRequest("Each symlink needs a 'name' string.")
    source = item.get("source_path")
    if not isinstance(source, str) or not source:
        raise BadRequest(f"The symlink {item['name']} needs a 'source_path' string.")
    return SymlinkSpec(name=item["name"], source_path=source)


def request_details(
    files: list[FileSpec], symlinks: list[SymlinkSpec], previous: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What was asked for, without file contents (they can be large)."""
    previous = previous or {}
    return {
        "files": [*previous.get("files", []), *({"name": f.name} for f in files)],
        "symlinks": [
            *previous.get("symlinks", []),
            *({"name": s.name, "source_path": s.source_path} for s in symlinks),
        ],
    }
