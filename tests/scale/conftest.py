"""Scale tests: several API and worker processes (``tests/stack.py``), one stack per
module; the markers, the logs-on-failure hook and ``client_key`` are the fault tests'."""

from tests.faults.conftest import client_key, pytest_configure, pytest_runtest_makereport

__all__ = ["client_key", "pytest_configure", "pytest_runtest_makereport"]
