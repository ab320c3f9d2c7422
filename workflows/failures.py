"""Reading failures inside workflows (pure: no I/O)."""

from __future__ import annotations


def root_cause(err: BaseException) -> str:
    """The innermost message of an activity failure chain, for a user-facing reason."""
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err) or type(err).__name__
