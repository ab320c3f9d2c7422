"""The wire contract's shapes as typed models, for the OpenAPI description only.

Handlers keep reading their bodies and building their answers by hand: the contract's own
messages ("Missing required fields.", "Invalid JSON: ...") and its check order (the caller,
then the id, then the body) could not survive a framework's validation running first. These
models say what those hand-written paths accept and answer; the fuzz tests hold every real
answer against them.

Request models go through msgspec's JSON Schema generator (``api.openapi``), responses
through Litestar's (``ResponseSpec``). ``UNSET`` marks a key a client may leave out.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

# The statuses as the OpenAPI document spells them out, value by value (core/status.py has
# the enums the code uses; tests/contract/test_openapi_document.py holds the two equal).
WorkspaceStatus = Literal["initializing", "idle", "active", "deleting", "error"]
JobStatus = Literal["pending", "running", "stopping", "complete", "failed"]


class _Model(msgspec.Struct):
    pass


# --- requests ---------------------------------------------------------------------------


class UserInfo(_Model):
    """Who the API client vouches for; created on first sight."""

    username: str
    email: str
    first_name: str | UnsetType = UNSET
    last_name: str | UnsetType = UNSET


class TokenRequest(_Model):
    """An API client's key with the user's details (local sign-in), or an identity
    provider's token (`auth_token`) when the server signs in through one."""

    client_token: Annotated[str, Meta(description="Key of a member of the api_clients group.")] \
        | UnsetType = UNSET
    user_info: UserInfo | UnsetType = UNSET
    auth_token: Annotated[str, Meta(description="An identity provider's access token.")] \
        | UnsetType = UNSET


class WorkspaceFile(_Model):
    """A file written into the workspace; `name` is relative to its root."""

    name: str
    content: str | UnsetType = UNSET


class WorkspaceSymlink(_Model):
    """A link named `name` in the workspace to `source_path`, which must lie below one
    of the roots the operator allowed."""

    name: str
    source_path: str


class WorkspaceDetailsRequest(_Model):
    files: list[WorkspaceFile] | UnsetType = UNSET
    symlinks: list[WorkspaceSymlink] | UnsetType = UNSET


class WorkspaceCreate(_Model):
    name: Annotated[str, Meta(max_length=256)]
    description: str
    default_job_type: Annotated[str | None, Meta(
        description="The id of a job type (GET /job_types/); empty or null: none.")] \
        | UnsetType = UNSET
    workspace_details: WorkspaceDetailsRequest | UnsetType | None = UNSET


class WorkspaceUpdate(_Model):
    """Every key optional: what is given is changed, files and symlinks are added."""

    name: Annotated[str, Meta(max_length=256)] | UnsetType = UNSET
    description: str | UnsetType = UNSET
    default_job_type: str | UnsetType | None = UNSET
    workspace_details: WorkspaceDetailsRequest | UnsetType | None = UNSET


class JobStart(_Model):
    """Without `job_type` the workspace's default job type runs."""

    job_type: Annotated[str, Meta(description="The id of a job type (GET /job_types/).")] \
        | UnsetType = UNSET
    job_details: dict[str, Any] | UnsetType = UNSET
    resource_options: Annotated[dict[str, Any], Meta(
        description="Values for the parameters GET /parameters/ lists; unknown names are "
                    "ignored.")] | UnsetType = UNSET


class JobExtend(_Model):
    minutes: Annotated[int, Meta(ge=1)]


class ShareCreate(_Model):
    original_workspace_id: int
    shared_user_ids: list[int]


REQUEST_MODELS: tuple[type[_Model], ...] = (
    TokenRequest, WorkspaceCreate, WorkspaceUpdate, JobStart, JobExtend, ShareCreate,
)


# --- responses --------------------------------------------------------------------------


class ErrorResponse(_Model):
    """Every error: `message` says what went wrong, in the contract's words."""

    success: Literal[False]
    message: str


class MessageResponse(_Model):
    success: Literal[True]
    message: str


class TokenResponse(_Model):
    success: Literal[True]
    message: str
    token: Annotated[str, Meta(description="Send as `UWS-Authorization: Token <token>`.")]


class FileEntry(_Model):
    name: str


class SymlinkEntry(_Model):
    name: str
    source_path: str | UnsetType = UNSET


class DetailsView(_Model):
    files: list[FileEntry] | UnsetType = UNSET
    symlinks: list[SymlinkEntry] | UnsetType = UNSET


class WorkspaceDetails(_Model):
    request_workspace_details: Annotated[
        DetailsView, Meta(description="What was asked for (file contents left out).")]
    current_workspace_details: Annotated[
        DetailsView, Meta(description="What is on disk (dot-files left out), names with "
                                      "a leading `/`.")]


class Workspace(_Model):
    id: int
    name: str
    description: str
    disk_space: int
    datetime_created: datetime
    datetime_last_modified: datetime
    datetime_last_job_launch: datetime | None
    workspace_details: WorkspaceDetails
    status: WorkspaceStatus
    default_job_type: str | None


class WorkspaceList(_Model):
    workspaces: list[Workspace]


class WorkspaceListResponse(_Model):
    success: Literal[True]
    message: str
    data: WorkspaceList


class WorkspaceCreated(_Model):
    workspace: Workspace


class WorkspaceCreatedResponse(_Model):
    success: Literal[True]
    message: str
    data: WorkspaceCreated


class JobDetails(_Model):
    request_job_details: dict[str, Any] | UnsetType = UNSET
    current_job_details: Annotated[dict[str, Any], Meta(
        description="For a session: `message` (\"Webserver ready.\" once up), "
                    "`proxy_details` and `connection_details` {`url_domain`, `url_path`}; "
                    "the browser opens url_domain + url_path.")] | UnsetType = UNSET
    metrics: dict[str, Any] | UnsetType = UNSET


class Job(_Model):
    id: int
    workspace_id: Annotated[int, Meta(description="null once the workspace is deleted.")] \
        | None
    resource_job_id: int
    job_type: str
    status: JobStatus
    datetime_created: datetime
    datetime_start: datetime | None
    datetime_end: datetime | None
    core_hours: float
    job_details: JobDetails


class JobList(_Model):
    jobs: list[Job]


class JobListResponse(_Model):
    success: Literal[True]
    message: str
    data: JobList


class JobStarted(_Model):
    job: Job


class JobStartedResponse(_Model):
    success: Literal[True]
    message: str
    data: JobStarted


class JobEvent(_Model):
    """One entry of a job's timeline; which keys appear depends on `type`."""

    time: str
    type: str
    status: str | UnsetType = UNSET
    detail: str | UnsetType = UNSET
    step: str | UnsetType = UNSET
    attempt: int | UnsetType = UNSET
    error: str | UnsetType = UNSET
    name: str | UnsetType = UNSET


class JobEvents(_Model):
    events: list[JobEvent]


class JobEventsResponse(_Model):
    success: Literal[True]
    message: str
    data: JobEvents


class TimeLimit(_Model):
    time_limit_min: Annotated[float, Meta(description="The job's whole time limit now.")]


class TimeLimitResponse(_Model):
    success: Literal[True]
    message: str
    data: TimeLimit


class JobType(_Model):
    id: str
    name: str


class JobTypes(_Model):
    job_types: Annotated[dict[str, JobType], Meta(description="By job type id.")]


class JobTypesResponse(_Model):
    success: Literal[True]
    message: str
    data: JobTypes


class ParameterValidation(_Model):
    required: bool
    type: Literal["int", "float", "str", "bool"] | UnsetType = UNSET
    min: float | UnsetType = UNSET
    max: float | UnsetType = UNSET


class ParameterInfo(_Model):
    display_name: str
    description: str
    variable_name: str
    default_value: Any
    validation: ParameterValidation


class Parameters(_Model):
    parameters: list[ParameterInfo]


class ParametersResponse(_Model):
    success: Literal[True]
    message: str
    data: Parameters


class Health(_Model):
    connected: bool
    message: str


class Dependencies(_Model):
    main_resource: Health
    api_user_authentication: Health
    resources: dict[str, Health]
    storage_methods: dict[str, Health]
    user_authentication_methods: dict[str, Health]
    job_types: dict[str, Health]
    database: Health
    temporal: Health


class StatusResponse(_Model):
    success: Literal[True]
    message: str
    version: str
    build: str
    dependencies: Dependencies


class UserSummary(_Model):
    id: int
    first_name: str
    last_name: str
    username: str
    email: str


class Users(_Model):
    users: list[UserSummary]


class UsersResponse(_Model):
    success: Literal[True]
    message: str
    data: Users


class Quota(_Model):
    """Limits are null when none is set; core-hours reserved by running jobs count
    against the limit until they end."""

    max_disk_space: int | None
    used_disk_space: int
    reserved_disk_space: int
    max_core_hours: float | None
    used_core_hours: float
    reserved_core_hours: float
    available_core_hours: float | None


class QuotaData(_Model):
    quota: Quota


class QuotaResponse(_Model):
    success: Literal[True]
    message: str
    data: QuotaData


class ShareOwner(_Model):
    username: str
    first_name: str
    last_name: str
    email: str


class SharedWorkspaceSummary(_Model):
    id: int
    user_id: ShareOwner
    name: str
    description: str
    workspace_details: WorkspaceDetails


class Share(_Model):
    original_workspace_id: Annotated[SharedWorkspaceSummary, Meta(
        description="The sender's workspace.")]
    shared_workspace_id: Annotated[SharedWorkspaceSummary, Meta(
        description="The recipient's copy; its id names the share.")]
    last_resource_options: dict[str, Any]
    last_job_type: Annotated[str, Meta(description="\"\" when the original has no job.")]
    is_accepted: bool
    datetime_share_created: datetime


class ShareList(_Model):
    original_workspaces: Annotated[list[Share], Meta(description="Shares the caller sent.")]
    shared_workspaces: Annotated[list[Share], Meta(description="Shares the caller received.")]


class ShareListResponse(_Model):
    success: Literal[True]
    message: str
    data: ShareList


class SharesCreated(_Model):
    shared_workspaces: list[Share]


class SharesCreatedResponse(_Model):
    success: Literal[True]
    message: str
    data: SharesCreated
