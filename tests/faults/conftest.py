"""Fault tests: the real stack as processes (``tests/stack.py``), one stack per module.

Each module is marked ``faults`` (deselect with ``-m "not faults"``); a failing test
shows the tails of every process's log."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.stack import Stack

# The hook below serves tests/scale too (its conftest imports it); once per report.
OURS = (Path(__file__).parent, Path(__file__).parent.parent / "scale")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: kills and restarts real stack processes")
    config.addinivalue_line("markers", "scale: several API and worker processes")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    stack = getattr(item, "funcargs", {}).get("stack")
    mine = any(d in item.path.parents for d in OURS)
    shown = any(title == "stack logs" for title, _ in report.sections)
    if mine and not shown and report.failed and isinstance(stack, Stack):
        report.sections.append(("stack logs", stack.logs()))
    return report


@pytest.fixture(scope="module")
def client_key(stack: Stack) -> str:
    return stack.create_client_token("fault-tests")
