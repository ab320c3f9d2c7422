"""The history corpus is append-only: a new recording never replaces a file."""

from __future__ import annotations

from datetime import date
from pathlib import Path

from tests.replay.recording import recorded_as, write_new

DAY = date(2026, 12, 4)


def test_recordings_are_dated_and_never_overwrite(tmp_path: Path) -> None:
    (tmp_path / "job_stopped.json").write_text("old")  # an undated first recording
    first = write_new(tmp_path, "job_stopped", "a", DAY)
    second = write_new(tmp_path, "job_stopped", "b", DAY)
    third = write_new(tmp_path, "job_stopped", "c", DAY)
    assert [p.name for p in (first, second, third)] == [
        "job_stopped-20261204.json", "job_stopped-20261204-2.json",
        "job_stopped-20261204-3.json"]
    assert [p.read_text() for p in (first, second, third)] == ["a", "b", "c"]
    assert (tmp_path / "job_stopped.json").read_text() == "old"


def test_names_match_by_prefix() -> None:
    for stem in ("job_stopped", "job_stopped-20261204", "job_stopped-20261204-12"):
        assert recorded_as(stem, "job_stopped"), stem
    for stem in ("slurm_job_stopped", "job_stopped_late", "job_stopped-2026", "job_stop"):
        assert not recorded_as(stem, "job_stopped"), stem
