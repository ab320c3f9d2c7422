"""Every committed history replays against today's workflow code: a non-deterministic
change fails here instead of in production."""

from __future__ import annotations

from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from app.worker import WORKFLOWS
from tests.replay.recording import recorded_as

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))

# Every scenario the corpus must hold, by name: a file ``<name>.json`` (the first
# recordings) or ``<name>-<YYYYMMDD>[-<n>].json`` (recordings since, appended).
REQUIRED = {
    "delete_workspace_ok", "delete_workspace_refused", "job_complete", "job_stopped",
    "job_time_limit", "job_failed", "job_unreachable", "job_launch_retried",
    "share_resumed_accepted", "share_failed", "share_expired", "share_declined",
    "slurm_job_complete", "slurm_job_failed", "slurm_job_stopped", "slurm_job_time_limit",
    "slurm_job_unreachable", "slurm_launch_retried",
    "slurm_session_stopped", "slurm_session_idle_stopped", "slurm_session_queued",
    "slurm_session_worker_killed", "slurm_session_requeued",
    "scan_coalesced", "scan_continued_as_new", "upkeep_usage", "upkeep_reconcile",
    "job_launch_refused", "job_pending_too_long", "job_stopped_while_launching",
    "job_continued_as_new", "job_idle_stopped", "job_stopped_after_lost_start",
}


def test_histories_are_committed() -> None:
    stems = [p.stem for p in HISTORIES]
    missing = {name for name in REQUIRED if not any(recorded_as(s, name) for s in stems)}
    assert not missing, f"no recorded history for {sorted(missing)}"


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_replay(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    await Replayer(workflows=WORKFLOWS).replay_workflow(history)
