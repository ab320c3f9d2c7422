"""Saving real workflow histories for the replay tests.

Set ``UWS_RECORD_HISTORIES=1`` and run the workflow tests to (re)write them; commit the
JSON files. Without it nothing is written, so CI only replays.
"""

from __future__ import annotations

import os
from pathlib import Path

from temporalio.client import WorkflowHandle

HISTORIES = Path(__file__).parent / "histories"
REPO = Path(__file__).resolve().parents[2]


async def maybe_record(handle: WorkflowHandle, name: str) -> None:
    if os.environ.get("UWS_RECORD_HISTORIES") != "1":
        return
    history = await handle.fetch_history()
    HISTORIES.mkdir(exist_ok=True)
    # Failure stack traces name this checkout's path; replay never reads them.
    text = history.to_json().replace(str(REPO), "/repo")
    (HISTORIES / f"{name}.json").write_text(text)
