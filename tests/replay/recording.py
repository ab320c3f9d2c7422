"""Saving real workflow histories for the replay tests.

Set ``UWS_RECORD_HISTORIES=1`` and run the workflow tests to record them; commit the new
JSON files. Without it nothing is written, so CI only replays.

The corpus is append-only: a recording is ``<name>-<YYYYMMDD>.json`` (``-2``, ``-3`` ...
when that exists) and never replaces a file, so the histories older code wrote keep
replaying against today's code: workflows still running in production were started by
that older code.
"""

from __future__ import annotations

import os
import re
from datetime import date
from pathlib import Path

from temporalio.client import WorkflowHandle

HISTORIES = Path(__file__).parent / "histories"
REPO = Path(__file__).resolve().parents[2]


def recorded_as(stem: str, name: str) -> bool:
    """Whether the history file ``<stem>.json`` is a recording of ``name``: ``name``
    itself (the first, undated recordings) or ``name-<date>[-<n>]``."""
    return re.fullmatch(re.escape(name) + r"(-\d{8}(-\d+)?)?", stem) is not None


def write_new(directory: Path, name: str, text: str, today: date | None = None) -> Path:
    """Write ``text`` as a new recording of ``name`` in ``directory``; never overwrites."""
    directory.mkdir(exist_ok=True)
    stem = f"{name}-{(today or date.today()):%Y%m%d}"
    for n in range(1, 10_000):
        path = directory / (f"{stem}.json" if n == 1 else f"{stem}-{n}.json")
        try:
            with path.open("x", encoding="utf-8") as out:  # "x": fails if it exists
                out.write(text)
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"too many recordings of {name} on one day")


async def maybe_record(handle: WorkflowHandle, name: str) -> Path | None:
    if os.environ.get("UWS_RECORD_HISTORIES") != "1":
        return None
    history = await handle.fetch_history()
    # Failure stack traces name this checkout's path; replay never reads them.
    text = history.to_json().replace(str(REPO), "/repo")
    return write_new(HISTORIES, name, text)
