"""``config.toml``: which controllers exist and how they are wired.

The shape follows the reference server's ``config.json`` (api auth method, main storage,
main resource, the available auth methods, storages, resources and job types, and the job
``parameters``). Loading validates the whole file with pydantic, then the cross-references
between sections; plugin settings are validated by ``controllers.registry`` against each
plugin's own model. Every failure is a ``ConfigError`` naming the file, the key path and
the reason, so a wrong key stops the server before it serves anything.

Secrets never live in the file: a plugin setting ending in ``_env`` names the environment
variable holding one (``client_secret_env``, ``password_env``, ``token_env``). Each such
variable ``NAME`` may instead be given as ``NAME_FILE``, the path of a file holding the
secret (how container platforms mount secrets): loading reads the file into ``NAME`` for
the plugins, and a missing or empty file stops start-up like a wrong key.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.settings import SettingsError, read_secret_file


class ConfigError(Exception):
    def __init__(self, file: Path | str, key_path: str, reason: str) -> None:
        super().__init__(f"{file}: {key_path or '<top level>'}: {reason}")
        self.file = str(file)
        self.key_path = key_path
        self.reason = reason


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AuthMethodConfig(_Strict):
    name: str
    user_authentication_type: str
    connection_details: dict[str, Any] = Field(default_factory=dict)


class StorageConfig(_Strict):
    name: str
    storage_type: str
    user_authentication: str
    root_dir: str
    connection_details: dict[str, Any] = Field(default_factory=dict)


class ResourceConfig(_Strict):
    name: str
    resource_type: str
    storage: str
    user_authentication: str
    # Where browsers open sessions (a session link's url_domain). Unset: the address each
    # client reached the API at, filled in by the API (the worker cannot know it).
    passthrough_domain: str = ""
    connection_details: dict[str, Any] = Field(default_factory=dict)
    parameter_mapping: dict[str, str] = Field(default_factory=dict)


class JobTypeConfig(_Strict):
    name: str
    job_type: str
    environment_details: dict[str, dict[str, Any]] = Field(default_factory=dict)


ParamType = Literal["int", "float", "str", "bool"]


class ParameterValidation(_Strict):
    type: ParamType | None = None
    min: int | float | None = None
    max: int | float | None = None
    required: bool = False


class ParameterConfig(_Strict):
    display_name: str
    description: str = ""
    variable_name: str
    default_value: Any = None
    validation: ParameterValidation = Field(default_factory=ParameterValidation)


class SharingConfig(_Strict):
    expiry_days: float = Field(30.0, gt=0, description="An unaccepted share is removed after this.")
    # Each pending copy holds disk (charged to the sharer) and a workflow: a sender may
    # have at most this many not yet accepted at once.
    max_pending_per_user: int = Field(20, ge=1, le=10_000, strict=True,
                                      description="Shares one user may have pending at once.")


class UpkeepConfig(_Strict):
    usage_interval_minutes: float = Field(60.0, gt=0)
    reconcile_interval_minutes: float = Field(10.0, gt=0)


class AppConfig(_Strict):
    api_user_authentication: str
    main_storage: str
    main_resource: str
    available_user_authentication: dict[str, AuthMethodConfig] = Field(min_length=1)
    available_storage: dict[str, StorageConfig] = Field(min_length=1)
    available_resources: dict[str, ResourceConfig] = Field(min_length=1)
    available_job_types: dict[str, JobTypeConfig] = Field(min_length=1)
    parameters: list[ParameterConfig] = Field(default_factory=list)
    sharing: SharingConfig = Field(default_factory=SharingConfig)
    upkeep: UpkeepConfig = Field(default_factory=UpkeepConfig)
    # Validated by ``controllers.notify.email.EmailSettings`` when the plugins are built.
    email: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references_resolve(self) -> AppConfig:
        def need(section: str, names: dict[str, Any], key: str, value: str) -> None:
            if value not in names:
                known = ", ".join(sorted(names)) or "none"
                raise _RefError(key, f"{value!r} is not in {section} (known: {known})")

        auth = self.available_user_authentication
        need("available_user_authentication", auth, "api_user_authentication",
             self.api_user_authentication)
        need("available_storage", self.available_storage, "main_storage", self.main_storage)
        need("available_resources", self.available_resources, "main_resource", self.main_resource)
        for sid, s in self.available_storage.items():
            need("available_user_authentication", auth,
                 f"available_storage.{sid}.user_authentication", s.user_authentication)
        for rid, r in self.available_resources.items():
            need("available_storage", self.available_storage,
                 f"available_resources.{rid}.storage", r.storage)
            need("available_user_authentication", auth,
                 f"available_resources.{rid}.user_authentication", r.user_authentication)
        for jid, j in self.available_job_types.items():
            for rid in j.environment_details:
                need("available_resources", self.available_resources,
                     f"available_job_types.{jid}.environment_details.{rid}", rid)
        seen: set[str] = set()
        for i, p in enumerate(self.parameters):
            if p.variable_name in seen:
                raise _RefError(f"parameters.{i}.variable_name",
                                f"{p.variable_name!r} is defined twice")
            seen.add(p.variable_name)
        return self

    def parameter(self, variable_name: str) -> ParameterConfig | None:
        return next((p for p in self.parameters if p.variable_name == variable_name), None)


class _RefError(ValueError):
    def __init__(self, key_path: str, reason: str) -> None:
        super().__init__(reason)
        self.key_path = key_path
        self.reason = reason


# Variables this process filled from their ``_FILE`` twin, with the value put there: a
# second load (the API and the worker in one test process) may refill them.
_filled_from_files: dict[str, str] = {}


def _secret_env_names(data: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(key path, variable name) of every ``*_env`` setting of the plugins and e-mail."""
    def walk(node: Any, path: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{path}.{key}" if path else str(key)
                if str(key).endswith("_env") and isinstance(value, str) and value:
                    yield here, value
                else:
                    yield from walk(value, here)

    for section in ("available_user_authentication", "available_storage",
                    "available_resources"):
        for name, entry in (data.get(section) or {}).items():
            if isinstance(entry, dict):
                yield from walk(entry.get("connection_details"),
                                f"{section}.{name}.connection_details")
    yield from walk(data.get("email"), "email")


def export_secret_files(data: dict[str, Any], file: Path | str,
                        environ: MutableMapping[str, str] | None = None) -> None:
    """Fill each secret variable the config names from ``<NAME>_FILE`` when that is set."""
    env = os.environ if environ is None else environ
    for key_path, name in _secret_env_names(data):
        path = env.get(f"{name}_FILE")
        if not path:
            continue
        try:
            value = read_secret_file(path, f"{name}_FILE")
        except SettingsError as exc:
            raise ConfigError(file, key_path, str(exc)) from None
        current = env.get(name)
        if current and current not in (value, _filled_from_files.get(name)):
            raise ConfigError(file, key_path, f"set either {name} or {name}_FILE, not both")
        env[name] = value
        _filled_from_files[name] = value


def parse_config(data: dict[str, Any], file: Path | str) -> AppConfig:
    export_secret_files(data, file)
    try:
        return AppConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        ctx_error = (err.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _RefError):
            raise ConfigError(file, ctx_error.key_path, ctx_error.reason) from None
        key_path = ".".join(str(part) for part in err["loc"])
        raise ConfigError(file, key_path, err["msg"]) from None


def load_config(path: Path | str) -> AppConfig:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read the file ({exc.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"not valid TOML ({exc})") from None
    return parse_config(data, path)
