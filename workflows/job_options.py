"""What ``JobWorkflow``'s modules share: timeouts, retry policies and the names of its
patches (each recorded in the histories of the workflows that took it: never rename one).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

QUICK = timedelta(seconds=30)
RETRY_FOREVER = RetryPolicy(
    initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=30),
)
# A watch heartbeats every few seconds; a worker that died mid-watch is noticed after this.
WATCH_HEARTBEAT = timedelta(seconds=15)
# A local step (a local activity) may run this long, its workflow task kept alive meanwhile.
LOCAL_STEP = timedelta(minutes=5)
# A step that may wait on a resource (a launch, a stop): how long one attempt may take.
RESOURCE_STEP = timedelta(minutes=5)
ABANDON_STEP = timedelta(minutes=2)

# An extension restarts the running watch, whose activity then tells the resource.
PATCH_EXTEND_RESTARTS_WATCH = "extend-restarts-watch"
# Prepare and launch race a stop request, the time limit and the pending limit, and a
# failure that no retry can cure ends the job; before, they were awaited to the end.
PATCH_LAUNCH_RACES = "launch-races-stop-and-deadline"
# A job queued on the resource shows why (Slurm's Resources, Priority...) in its details
# and events, each time the reason changes.
PATCH_PENDING_REASON = "pending-reason-shown"
# Prepare, launch and a first look at the launched job run as local activities, in the
# workflow task's own worker, and the first status (usually "running") is written once:
# one server round trip to running instead of five (bench/jobs_latency.py).
PATCH_LOCAL_START = "local-start-steps"
# Status writes and the final write as local activities too (the timeline reads them
# from their markers).
PATCH_LOCAL_RECORDS = "local-status-records"
# Prepare, launch, the first look and the first status write as one local activity
# (``start_job``): each local activity costs the worker ~2 ms of CPU, which is what 200
# jobs started at once wait for (bench/jobs_latency.py).
PATCH_ONE_START_STEP = "one-start-step"


def permanent_reason(err: ActivityError | ApplicationError) -> str | None:
    """The user's message of a failure the activity marked as never curable (a local
    activity's failure arrives as that ApplicationError itself, not wrapped)."""
    for failure in (err, err.cause):
        if isinstance(failure, ApplicationError) and failure.non_retryable:
            return failure.message
    return None
