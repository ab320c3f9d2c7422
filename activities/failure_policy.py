"""One failure policy for every activity, at the edge where controllers meet Temporal.

A controller says what kind of failure it met (``controllers.errors``): "this will never
work as asked" (a refused request, a resource or job type no longer configured:
``InvalidRequest`` and the other client-side kinds) becomes a
non-retryable ``ApplicationError`` carrying the user's message, so the workflow can end
the job with the reason instead of retrying forever; "unavailable right now" and every
other error stay retryable. Retried failures of a job's own steps are written to the
job's row as they happen, so a job that waits shows why it waits.
"""

from __future__ import annotations

import logging
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from controllers import errors
from db import jobs as job_rows

log = logging.getLogger(__name__)

# Failures no retry can cure: the request itself, or the configuration, is wrong.
PERMANENT: tuple[type[errors.ControllerError], ...] = (
    errors.InvalidRequest, errors.Forbidden, errors.AuthenticationFailed,
    errors.PayloadTooLarge,
)
# Steps of a job whose retries the job's events show.
_JOB_STEPS = {"prepare_job": "preparing", "launch_job": "launch", "start_job": "launch"}


class FailurePolicyInterceptor(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _FailurePolicy(next)


class _FailurePolicy(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await self.next.execute_activity(input)
        except PERMANENT as exc:
            raise ApplicationError(exc.user_message, type=type(exc).__name__,
                                   non_retryable=True) from exc
        except errors.ControllerError as exc:
            await _note_retry(input, exc.user_message)
            raise ApplicationError(exc.user_message, type=type(exc).__name__) from exc
        except Exception as exc:
            await _note_retry(input, f"{type(exc).__name__}: {exc}")
            raise


async def _note_retry(input: ExecuteActivityInput, reason: str) -> None:
    """An event on the job's row ("launch attempt 2 failed: ...; retrying")."""
    info = activity.info()
    step = _JOB_STEPS.get(info.activity_type)
    job_id = getattr(input.args[0], "job_id", None) if input.args else None
    if step is None or not isinstance(job_id, int):
        return
    try:
        await job_rows.record_event(
            job_id, f"{step} attempt {info.attempt} failed: {reason[:300]}; retrying")
    except Exception:  # the database may be what failed: the retry goes on regardless
        log.warning("could not record the retry of %s for job %s", info.activity_type, job_id)
