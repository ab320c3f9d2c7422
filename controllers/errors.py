"""Errors a controller raises for expected failures.

Each carries the message the user sees (the API renders it verbatim in the contract's
envelope), an optional fuller message for the log, and the HTTP-neutral kind of failure;
``api/errors.py`` maps kinds to status codes, so controllers never know about HTTP.
"""

from __future__ import annotations


class ControllerError(Exception):
    """Base of every expected controller failure."""

    def __init__(self, user_message: str, *, log_message: str | None = None) -> None:
        super().__init__(user_message)
        self.user_message = user_message
        self.log_message = log_message or user_message


class InvalidRequest(ControllerError):
    """What the client asked for cannot be done as asked (a 400)."""


class AuthenticationFailed(ControllerError):
    """The credentials offered do not identify a user (a 401)."""


class Forbidden(ControllerError):
    """The user is known but may not do this (a 403)."""


class PayloadTooLarge(ControllerError):
    """A body was larger than the configured limit (a 413)."""


class NotConfigured(InvalidRequest):
    """What a request names (a resource, a job type) is no longer in the configuration:
    no retry brings it back."""


class BackendError(ControllerError):
    """The backing system failed in a way the user cannot fix (a 500)."""


class InsufficientStorage(ControllerError):
    """The storage has no room left for what was asked (a 507): the request itself was
    fine and within every limit the server sets."""


class Unavailable(ControllerError):
    """The backing system cannot be reached right now; retrying later may work (a 503)."""
