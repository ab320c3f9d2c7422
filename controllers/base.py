"""The four kinds of plugin and their async contracts.

A plugin is chosen by its short name in ``config.toml`` and built by
``controllers.registry`` with its own validated ``Settings``. Plugins know nothing of
HTTP or Temporal: the API and the activities call them. Whatever state a plugin needs to
find its work again after a restart (a resource's job handle, say) it returns as a JSON-able
value that the caller keeps and passes back.

Abstract methods are enforced when a subclass is *instantiated*; ``__init_subclass__``
below makes a missing one fail when the plugin class is defined instead, so a broken plugin
fails at import, not at the first call.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from controllers.errors import InvalidRequest
from core.status import ResourceStatus
from core.values import ExternalAccount, UserInfo, WorkspaceScan

# The value types above live in core (every layer passes them); plugins import them here.
__all__ = ["ExternalAccount", "UserInfo", "WorkspaceScan"]


class PluginSettings(BaseModel):
    """Base of every plugin's settings: unknown keys are an error, naming the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Health(BaseModel):
    ok: bool
    detail: str = ""


class Plugin(ABC):
    """Common shape: a configured name, validated settings, a health check."""

    kind: ClassVar[str] = "plugin"
    Settings: ClassVar[type[PluginSettings]] = PluginSettings

    def __init__(self, name: str, settings: PluginSettings) -> None:
        self.name = name
        self.settings = settings

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if inspect.isabstract(cls) or cls.__dict__.get("abstract", False):
            return
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            raise TypeError(f"{cls.__name__} must implement {', '.join(missing)}")

    async def prepare(self) -> None:
        """Create what the plugin needs before the server serves (idempotent; called once
        per process at start-up)."""

    async def health(self) -> Health:
        """Whether the plugin can do its work now (``GET /status/`` shows it)."""
        return Health(ok=True)


# --- authentication -------------------------------------------------------------------


ApiClientCheck = Callable[[str], Awaitable[bool]]


class AuthMethod(Plugin):
    """Turns a ``POST /tokens/`` body into a user and gives that user an external account."""

    kind = "user_authentication"
    # What a /tokens/ body holds for this method: a trusted client's key vouching for
    # user_info, or a token of the identity provider's (for the help a dev server prints).
    takes_auth_token: ClassVar[bool] = False

    @property
    def token_source(self) -> str:
        """Where a client gets the ``auth_token`` this method takes, in a few words."""
        return ""

    @property
    def web_sign_in(self) -> bool:
        """The web page can send a browser to the provider (authorization code + PKCE):
        ``authorization_request`` and ``redeem_code`` then work."""
        return False

    async def authorization_request(self, redirect_uri: str, state: str, challenge: str) -> str:
        """The provider URL a browser signs in at, back to ``redirect_uri`` with a code."""
        raise NotImplementedError

    async def redeem_code(self, code: str, verifier: str, redirect_uri: str) -> str:
        """The access token a code (with its PKCE verifier) is worth at the provider."""
        raise NotImplementedError

    @property
    def serves_one_person(self) -> bool:
        """A personal server: the first user to sign in owns it, nobody else may."""
        return False

    def check_runnable(self) -> None:
        """Raise ``ValueError`` (with the reason) when this process cannot serve the
        method's accounts as configured; checked at start-up."""

    @abstractmethod
    async def identify(self, body: Mapping[str, Any], is_api_client: ApiClientCheck) -> UserInfo:
        """Return who ``body`` identifies, or raise ``InvalidRequest`` (malformed) or
        ``AuthenticationFailed``. ``is_api_client(key)`` tells whether a key belongs to a
        member of the api_clients group, for flows where a trusted client vouches."""

    @abstractmethod
    async def ensure_external_account(self, user: UserInfo) -> ExternalAccount:
        """Find (or create, when configured) the account for ``user``. It must exist when
        this returns: a user's first request never races its account's creation."""


# --- storage --------------------------------------------------------------------------


class FileSpec(BaseModel):
    name: str
    content: str = ""


class SymlinkSpec(BaseModel):
    name: str
    source_path: str


class CopyProgress(BaseModel):
    """How far a ``copy_workspace`` got; ``last_path`` is what a resumed copy passes back."""

    files_done: int = 0
    bytes_done: int = 0
    last_path: str = ""


class StagedUpload:
    """An upload received under a temporary name (``StorageMethod.stage_upload``);
    ``handle`` is the storage's own."""

    def __init__(self, filename: str, size: int, handle: Any) -> None:
        self.filename = filename
        self.size = size
        self.handle = handle


class StorageMethod(Plugin):
    """Owns workspace directories; every path a client names is confined to its workspace."""

    kind = "storage"

    @abstractmethod
    def workspace_path(self, account: ExternalAccount, workspace_id: int) -> str:
        """Where the workspace lives; decided once, at creation, and stored with it."""

    @abstractmethod
    async def create_workspace(self, path: str, account: ExternalAccount) -> None:
        """Create the empty directory (its parents as needed), owned by ``account``."""

    @abstractmethod
    async def validate_files(self, files: list[FileSpec], symlinks: list[SymlinkSpec]) -> None:
        """Reject, before anything is written, names that could not be confined."""

    @abstractmethod
    async def write_files(self, path: str, account: ExternalAccount, files: list[FileSpec],
                          symlinks: list[SymlinkSpec]) -> None:
        """Write files and create symlinks inside the workspace at ``path``."""

    async def save_upload(self, path: str, account: ExternalAccount, filename: str,
                          chunks: AsyncIterator[bytes]) -> int:
        """Stream one uploaded file into the workspace root; return its size. A failed or
        interrupted upload leaves no partial file."""
        staged = await self.stage_upload(path, account, filename, chunks)
        try:
            await self.commit_uploads([staged])
        finally:
            self.discard_uploads([staged])
        return staged.size

    @abstractmethod
    async def stage_upload(self, path: str, account: ExternalAccount, filename: str,
                           chunks: AsyncIterator[bytes]) -> StagedUpload:
        """Stream one uploaded file into the workspace under a temporary name, leaving the
        file of its final name untouched; a failed or interrupted stream leaves nothing.
        ``commit_uploads`` moves staged files into place, ``discard_uploads`` removes them,
        so a request of several files can be refused as a whole."""

    @abstractmethod
    async def commit_uploads(self, staged: list[StagedUpload]) -> None:
        """Move staged uploads onto their final names, in order."""

    @abstractmethod
    def discard_uploads(self, staged: list[StagedUpload]) -> None:
        """Remove whatever of ``staged`` is not committed and release it. Synchronous and
        quick on purpose: it also runs while a request is being cancelled."""

    @abstractmethod
    async def scan(self, path: str) -> WorkspaceScan:
        """Size and file tree of the workspace (confined to it; links are not followed)."""

    @abstractmethod
    async def delete_workspace(self, path: str) -> None:
        """Remove the workspace directory; removing one already gone is not an error."""

    @abstractmethod
    async def copy_workspace(
        self, source: str, target: str, account: ExternalAccount,
        resume_after: str = "", progress: Callable[[CopyProgress], None] | None = None,
    ) -> CopyProgress:
        """Copy ``source``'s files into the existing, empty-or-partly-copied ``target``
        (owned by ``account``): dot-files and dot-directories are skipped, symlinks are
        copied as symlinks (never followed), nothing outside ``source`` is read. Entries are
        copied in a stable sorted order; with ``resume_after`` (a ``last_path`` from an
        earlier progress report) the entries up to and including it are assumed done.
        ``progress`` is called after each entry. A file is written under a temporary name
        and renamed into place, so a crash never leaves a partial file under its real name."""


# --- compute resources and job types --------------------------------------------------


class JobState(BaseModel):
    """What a resource says of a job it launched.

    ``unknown`` means the resource could not tell (unreachable, a transient error): callers
    must never read it as ended.
    """

    status: ResourceStatus
    detail: str = ""
    exit_code: int | None = None
    core_hours: float | None = None
    hostname: str | None = None
    # Shown to clients in the job's current_job_details while it runs (a Slurm job's
    # time left, say); resources without such details leave it empty.
    details: dict[str, Any] = Field(default_factory=dict)


class LaunchRequest(BaseModel):
    """What a resource is given to launch a job: its script, to run in ``workdir`` as
    ``account``, with the options its user chose and the environment we add."""

    job_id: int
    script: str
    workdir: str
    account: ExternalAccount
    time_limit_min: float | None = None
    resource_options: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)


class ComputeResource(Plugin):
    """Runs job scripts.

    ``launch`` returns a JSON-able handle that the caller keeps and passes back to
    ``poll``, ``wait`` and ``stop``; a restart of the caller loses nothing. A retried
    ``launch`` for the same job id must find the job it already launched rather than
    launching a second one.
    """

    kind = "resource"

    def __init__(
        self, name: str, settings: PluginSettings, *, storage: StorageMethod,
        auth: AuthMethod, passthrough_domain: str, parameter_mapping: Mapping[str, str],
    ) -> None:
        super().__init__(name, settings)
        self.storage = storage
        self.auth = auth
        self.passthrough_domain = passthrough_domain
        self.parameter_mapping = dict(parameter_mapping)

    @abstractmethod
    async def launch(self, request: LaunchRequest) -> dict[str, Any]:
        """Launch (or find the already-launched) job; return its handle."""

    @abstractmethod
    async def poll(self, handle: Mapping[str, Any]) -> JobState:
        """The job's current state, answered at once."""

    async def wait(self, handle: Mapping[str, Any], timeout: float) -> JobState:
        """Return when the job has ended or ``timeout`` seconds passed, whichever is first.
        Resources that can be told of an exit (a local process) override this to answer
        at once; the default polls once at the end."""
        import asyncio

        await asyncio.sleep(timeout)
        return await self.poll(handle)

    async def ensure_time_limit(self, handle: Mapping[str, Any], deadline_epoch: float,
                                state: JobState) -> None:
        """Make sure the resource itself will not end the running job before
        ``deadline_epoch`` (our deadline, moved by an extension). Resources without a
        limit of their own (a local process: our workflow enforces it) need nothing."""

    @abstractmethod
    async def stop(self, handle: Mapping[str, Any], grace_seconds: float) -> None:
        """End the job; stopping one already ended is not an error."""

    async def abandon(self, job_id: int, workdir: str, account: ExternalAccount) -> float:
        """A launch of ``job_id`` was given up (a stop or the time limit came first) and its
        outcome is unknown: end whatever it may have started, and return the core-hours
        that used (0.0 when nothing had started). Idempotent; nothing started is not an
        error."""
        return 0.0

    def session_endpoint(self, job_id: int, account: ExternalAccount) -> SessionEndpoint:
        """Where job ``job_id``'s interactive session will listen (no I/O: the same answer
        before launch and while it runs). Resources that cannot host sessions refuse."""
        raise InvalidRequest("Interactive sessions are not available on this resource.")

    async def prepare_session(self, job_id: int, account: ExternalAccount) -> SessionEndpoint:
        """Create what the session's endpoint needs (its directory, its secret) before
        launch; idempotent until the job is launched."""
        return self.session_endpoint(job_id, account)

    def whole_option(self, options: Mapping[str, Any], canonical: str,
                     default: int | None) -> int | None:
        """A job's option that must be a whole number of at least 1 (CPUs, minutes), under
        the name ``parameter_mapping`` gives ``canonical``; ``default`` when not given."""
        key = self.parameter_mapping.get(canonical, canonical)
        value = options.get(key)
        if value is None:
            return default
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise InvalidRequest(f"{key} must be a whole number, not {value!r}.") from None
        if number < 1:
            raise InvalidRequest(f"{key} must be at least 1.")
        return number

    def resource_job_id(self, handle: Mapping[str, Any]) -> int:
        """The number clients see as ``resource_job_id``."""
        return int(handle.get("id", -1))


class SessionEndpoint(BaseModel):
    """Where an interactive session listens, decided by the resource before launch and
    never taken from anything the job writes. ``socket_path``: a Unix socket in a
    directory only the job's account and the service can open (the local resource);
    otherwise ``host`` and ``port`` (a compute node). ``token_file`` holds the session's
    secret, written by the server for the job to read: it is never put on a command line
    or into a workflow history."""

    socket_path: str = ""
    host: str = ""
    port: int = 0
    token_file: str = ""
    owner_uid: int | None = None
    # The host part of the session's passthrough path when the resource fixes it before
    # launch (a Unix socket's label); empty: the host the job is found running on.
    hostname: str = ""


class JobContext(BaseModel):
    """What a job type needs to know of the job it writes a script for."""

    job_id: int
    workdir: str
    resource_name: str
    passthrough_domain: str
    resource_options: dict[str, Any] = Field(default_factory=dict)
    job_details: dict[str, Any] = Field(default_factory=dict)
    session: SessionEndpoint | None = None


class Connection(BaseModel):
    """How to reach an interactive session once it answers."""

    message: str = "Webserver ready."
    proxy_details: dict[str, Any]
    connection_details: dict[str, Any]


class JobTypeSettings(PluginSettings):
    """What every job type's per-resource settings may say."""

    # A job still pending (not yet started, or queued on the resource) this long ends
    # ``failed`` with the reason, its quota released (None: waits as long as it takes).
    max_pending_minutes: float | None = Field(default=None, gt=0)


class JobType(Plugin):
    """Writes the script a job runs and, for interactive jobs, finds out how to reach it.

    Settings come per resource (``environment_details.<resource>`` in ``config.toml``);
    ``settings_for(resource)`` gives the validated ones.
    """

    kind = "job_type"
    interactive: ClassVar[bool] = False

    def __init__(self, name: str, settings_by_resource: Mapping[str, PluginSettings]) -> None:
        super().__init__(name, PluginSettings())
        self.settings_by_resource = dict(settings_by_resource)

    def settings_for(self, resource_name: str) -> PluginSettings:
        try:
            return self.settings_by_resource[resource_name]
        except KeyError:
            return self.Settings()

    def default_time_limit_min(self, resource_name: str) -> int | None:
        return getattr(self.settings_for(resource_name), "time_limit_min", None)

    def max_pending_min(self, resource_name: str) -> float | None:
        return getattr(self.settings_for(resource_name), "max_pending_minutes", None)

    def idle_timeout_min(self, resource_name: str) -> float | None:
        """Stop the job after this long without passthrough activity (``None``: never)."""
        return getattr(self.settings_for(resource_name), "idle_timeout_minutes", None)

    def validate_job_details(self, job_details: Mapping[str, Any]) -> None:
        """Raise ``InvalidRequest`` when a start request's ``job_details`` cannot make a
        script; called before the job exists. Most job types accept anything."""

    @abstractmethod
    def script(self, ctx: JobContext) -> str:
        """The shell script the resource runs for this job (run in ``ctx.workdir``)."""

    async def connection(self, ctx: JobContext, hostname: str) -> Connection | None:
        """For interactive jobs: the connection once the session answers, else ``None``
        (not up yet). Batch jobs have none."""
        return None
