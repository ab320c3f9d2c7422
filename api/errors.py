"""One error hierarchy, rendered in one place as the contract's envelope.

Handlers raise ``ApiError`` (or a controller's ``ControllerError``); Litestar's own
exceptions (404 route, 405 method, 413 body) are mapped here too, so every error a client
sees is ``{"success": false, "message": ...}``.
"""

from __future__ import annotations

import logging

import asyncpg
from litestar import Request, Response
from litestar.exceptions import HTTPException, MethodNotAllowedException, NotFoundException
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_401_UNAUTHORIZED,
    HTTP_403_FORBIDDEN,
    HTTP_404_NOT_FOUND,
    HTTP_405_METHOD_NOT_ALLOWED,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
    HTTP_507_INSUFFICIENT_STORAGE,
)
from temporalio.service import RPCError

from api.ids import parse_id
from controllers import errors as cerr

log = logging.getLogger("uws.api")


class ApiError(Exception):
    status_code = HTTP_400_BAD_REQUEST

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code


class BadRequest(ApiError):
    """The request cannot be done as sent; the message says why."""

    status_code = HTTP_400_BAD_REQUEST


class NotAuthenticated(ApiError):
    status_code = HTTP_401_UNAUTHORIZED


class PermissionDenied(ApiError):
    """Who asked may not do this (a personal server's stranger, a wrong group); the
    contract's 403."""

    status_code = HTTP_403_FORBIDDEN


class NotFound(ApiError):
    status_code = HTTP_404_NOT_FOUND


class Unprocessable(ApiError):
    """Well-formed, but its values break the configured rules (resource options)."""

    status_code = HTTP_422_UNPROCESSABLE_ENTITY


class ServerError(ApiError):
    status_code = HTTP_500_INTERNAL_SERVER_ERROR


class ServiceUnavailable(ApiError):
    """Something we depend on (Temporal, the database, a provider) cannot answer now:
    the client may try again, and nothing was changed."""

    status_code = HTTP_503_SERVICE_UNAVAILABLE


_CONTROLLER_STATUS: dict[type[cerr.ControllerError], int] = {
    cerr.InvalidRequest: HTTP_400_BAD_REQUEST,
    cerr.AuthenticationFailed: HTTP_401_UNAUTHORIZED,
    cerr.Forbidden: HTTP_403_FORBIDDEN,
    cerr.PayloadTooLarge: HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    cerr.BackendError: HTTP_500_INTERNAL_SERVER_ERROR,
    cerr.Unavailable: HTTP_503_SERVICE_UNAVAILABLE,
    cerr.InsufficientStorage: HTTP_507_INSUFFICIENT_STORAGE,
}


def envelope(status_code: int, message: str) -> Response:
    return Response({"success": False, "message": _encodable(message)}, status_code=status_code)


def _encodable(message: str) -> str:
    """``message`` with lone surrogates escaped: a message quoting client input (a file
    name) must still serialise, or the 400 itself would become a 500."""
    try:
        message.encode("utf-8")
    except UnicodeEncodeError:
        return message.encode("utf-8", "backslashreplace").decode("utf-8")
    return message


def _log_ids(request: Request) -> dict[str, int]:
    """The ids a log line carries as ``extra`` (JSON log keys): the path's job or
    workspace, and the caller when known."""
    ids = {key: parsed for key in ("job_id", "workspace_id")
           if (parsed := parse_id(str(request.path_params.get(key, "")))) is not None}
    user = request.scope.get("state", {}).get("user")
    if user is not None:
        ids["user_id"] = user.id
    return ids


def _api_error(_: Request, exc: ApiError) -> Response:
    return envelope(exc.status_code, exc.message)


def controller_status(exc: cerr.ControllerError) -> int:
    """The HTTP status of a controller's failure (also what the web page answers)."""
    return next(
        (code for kind, code in _CONTROLLER_STATUS.items() if isinstance(exc, kind)),
        HTTP_500_INTERNAL_SERVER_ERROR,
    )


def _controller_error(request: Request, exc: cerr.ControllerError) -> Response:
    status = controller_status(exc)
    if exc.log_message != exc.user_message or status >= 500:
        log.warning("%s %s: %s", request.method, request.url.path, exc.log_message,
                    extra=_log_ids(request))
    return envelope(status, exc.user_message)


def _http_exception(request: Request, exc: HTTPException) -> Response:
    if isinstance(exc, MethodNotAllowedException):
        response = envelope(HTTP_405_METHOD_NOT_ALLOWED, f'Method "{request.method}" not allowed.')
        if exc.headers:
            response.headers.update(exc.headers)
        return response
    if isinstance(exc, NotFoundException):
        return envelope(HTTP_404_NOT_FOUND, "Not found.")
    if exc.status_code == HTTP_413_REQUEST_ENTITY_TOO_LARGE:
        return envelope(exc.status_code, "Request body is larger than this server accepts.")
    return envelope(exc.status_code, str(exc.detail))


def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc,
                  extra=_log_ids(request))
    return envelope(HTTP_500_INTERNAL_SERVER_ERROR,
                    "Internal server error. Please contact an administrator.")


def _db_unavailable(request: Request, exc: Exception) -> Response:
    log.error("%s %s: database unavailable: %s", request.method, request.url.path, exc)
    return envelope(HTTP_503_SERVICE_UNAVAILABLE,
                    "The database is unavailable right now. Please try again shortly.")


def _temporal_unavailable(request: Request, exc: Exception) -> Response:
    log.error("%s %s: Temporal unavailable: %s", request.method, request.url.path, exc)
    return envelope(HTTP_503_SERVICE_UNAVAILABLE,
                    "The workflow service is unavailable right now. Please try again shortly.")


def _unstorable_text(request: Request, exc: Exception) -> Response:
    # PostgreSQL text and jsonb cannot hold NUL; such input is the client's error.
    return envelope(HTTP_400_BAD_REQUEST, "Text may not contain NUL characters.")


def exception_handlers() -> dict:

    return {
        ApiError: _api_error,
        cerr.ControllerError: _controller_error,
        HTTPException: _http_exception,
        ConnectionRefusedError: _db_unavailable,
        RPCError: _temporal_unavailable,
        asyncpg.exceptions.CannotConnectNowError: _db_unavailable,
        asyncpg.exceptions.ConnectionDoesNotExistError: _db_unavailable,
        asyncpg.exceptions.TooManyConnectionsError: _db_unavailable,
        asyncpg.exceptions.CharacterNotInRepertoireError: _unstorable_text,
        asyncpg.exceptions.UntranslatableCharacterError: _unstorable_text,
        Exception: _unexpected,
    }
