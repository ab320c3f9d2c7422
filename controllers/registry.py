"""Plugins by short name, and building them from ``config.toml``.

Plugins are found through the ``uws.controllers`` entry points (``pyproject.toml``): the
built-in ones are registered there like any other, so a site adds its own by installing a
package that declares one, without forking (as JupyterHub finds spawners). A name maps to
one class, whose base (``AuthMethod``, ``StorageMethod``, ``ComputeResource``,
``JobType``) says which kind of plugin it is; nothing is imported from a string the
configuration makes up. Dependencies are injected as in the reference: a storage gets its
auth method, a resource its storage and auth method.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from controllers.base import AuthMethod, ComputeResource, JobType, Plugin, StorageMethod
from controllers.errors import NotConfigured
from controllers.notify.email import EmailConfigError, EmailNotifier, EmailSettings
from core.config import AppConfig, ConfigError

ENTRY_POINT_GROUP = "uws.controllers"
P = TypeVar("P", bound=Plugin)
log = logging.getLogger(__name__)


def plugin_classes(base: type[P]) -> dict[str, type[P]]:
    """Every plugin of ``base``'s kind that is registered and loads, by name (loaded now).
    One that fails to import is left out (and logged): it breaks only a config naming it."""
    found: dict[str, type[P]] = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
        except Exception as exc:  # a site's package, broken: not ours to crash on here
            log.warning("plugin %s (%s) does not load: %s", entry.name, entry.value, exc)
            continue
        if isinstance(cls, type) and issubclass(cls, base):
            found[entry.name] = cls
    return found


def _load(entry: EntryPoint, file: str, key: str) -> Any:
    try:
        return entry.load()
    except Exception as exc:
        raise ConfigError(file, key, f"plugin {entry.name!r} ({entry.value}) does not load: "
                          f"{type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class Controllers:
    """Every configured plugin by its configured name, and the configuration itself: built
    once per process (``build_controllers``), passed to what needs them."""

    config: AppConfig
    auth: dict[str, AuthMethod]
    storage: dict[str, StorageMethod]
    resources: dict[str, ComputeResource]
    notifier: EmailNotifier
    job_types: dict[str, JobType]

    @property
    def api_auth(self) -> AuthMethod:
        return self.auth[self.config.api_user_authentication]

    @property
    def main_storage(self) -> StorageMethod:
        return self.storage[self.config.main_storage]

    @property
    def main_resource(self) -> ComputeResource:
        return self.resources[self.config.main_resource]

    def resource(self, name: str) -> ComputeResource:
        """The resource a job names; one removed from the configuration is permanent."""
        try:
            return self.resources[name]
        except KeyError:
            raise NotConfigured(f"The resource {name} is no longer configured.") from None

    def job_type(self, name: str) -> JobType:
        try:
            return self.job_types[name]
        except KeyError:
            raise NotConfigured(f"The job type {name} is no longer configured.") from None

    def storage_for(self, name: str) -> StorageMethod:
        """The storage a workspace row names (rows made before it had a name: the main)."""
        return self.storage.get(name) or self.main_storage

    @property
    def storage_auth(self) -> AuthMethod:
        """The auth method whose accounts own the main storage's workspaces."""
        return self.auth[self.config.available_storage[self.config.main_storage]
                         .user_authentication]

    def resource_auth(self, resource_name: str) -> AuthMethod:
        """The auth method whose accounts run jobs on ``resource_name``."""
        resource = self.config.available_resources.get(resource_name)
        if resource is None:
            raise NotConfigured(f"The resource {resource_name} is no longer configured.")
        return self.auth[resource.user_authentication]

    async def prepare(self) -> None:
        for plugin in self.all():
            await plugin.prepare()

    def all(self) -> list[Plugin]:
        return [*self.auth.values(), *self.storage.values(), *self.resources.values(),
                *self.job_types.values()]


def _lookup(base: type[P], name: str, file: str, key: str) -> type[P]:
    """The plugin ``name`` of ``base``'s kind, loading only its own entry point."""
    for entry in entry_points(group=ENTRY_POINT_GROUP, name=name):
        cls = _load(entry, file, key)
        if isinstance(cls, type) and issubclass(cls, base):
            return cls
        raise ConfigError(file, key, f"plugin {name!r} is not a {base.kind} plugin "
                          f"({entry.value})")
    known = ", ".join(sorted(plugin_classes(base)))
    raise ConfigError(file, key, f"unknown plugin {name!r} (known: {known})")


def _settings(cls: type[Plugin], data: dict[str, Any], file: str, key: str) -> Any:
    try:
        return cls.Settings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        sub = ".".join(str(p) for p in err["loc"])
        raise ConfigError(file, f"{key}.{sub}" if sub else key, err["msg"]) from None


# Settings naming a directory of the service's own: relative ones live under UWS_DATA_DIR.
_SERVICE_DIRS = ("state_dir", "sessions_dir")


def _under_data_dir(cls: type[Plugin], details: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    fields = cls.Settings.model_fields
    resolved = dict(details)
    for name in _SERVICE_DIRS:
        if name in fields:
            path = Path(resolved.get(name, fields[name].default))
            resolved[name] = str((path if path.is_absolute() else data_dir / path).resolve())
    return resolved


def build_controllers(config: AppConfig, *, file: str, data_dir: Path) -> Controllers:
    """Instantiate every configured plugin, validating its settings."""
    auth: dict[str, AuthMethod] = {}
    for aid, a in config.available_user_authentication.items():
        key = f"available_user_authentication.{aid}"
        cls = _lookup(AuthMethod, a.user_authentication_type, file,
                      f"{key}.user_authentication_type")
        auth[aid] = cls(aid, _settings(cls, a.connection_details, file,
                                       f"{key}.connection_details"))
        try:
            auth[aid].check_runnable()
        except ValueError as exc:
            raise ConfigError(file, f"{key}.connection_details.accounts", str(exc)) from None

    storage: dict[str, StorageMethod] = {}
    for sid, s in config.available_storage.items():
        key = f"available_storage.{sid}"
        cls = _lookup(StorageMethod, s.storage_type, file, f"{key}.storage_type")
        root = Path(s.root_dir)
        root = root if root.is_absolute() else (data_dir / root)
        data = {**s.connection_details, "root_dir": str(root.resolve())}
        storage[sid] = cls(sid, _settings(cls, data, file, f"{key}.connection_details"))

    resources: dict[str, ComputeResource] = {}
    for rid, r in config.available_resources.items():
        key = f"available_resources.{rid}"
        cls = _lookup(ComputeResource, r.resource_type, file, f"{key}.resource_type")
        details = _under_data_dir(cls, r.connection_details, data_dir)
        resources[rid] = cls(
            rid, _settings(cls, details, file, f"{key}.connection_details"),
            storage=storage[r.storage], auth=auth[r.user_authentication],
            passthrough_domain=r.passthrough_domain, parameter_mapping=r.parameter_mapping,
        )

    job_types: dict[str, JobType] = {}
    for jid, j in config.available_job_types.items():
        key = f"available_job_types.{jid}"
        cls = _lookup(JobType, j.job_type, file, f"{key}.job_type")
        per_resource = {
            rid: _settings(cls, env, file, f"{key}.environment_details.{rid}")
            for rid, env in j.environment_details.items()
        }
        job_types[jid] = cls(jid, per_resource)

    try:
        email = EmailSettings.model_validate(config.email)
        notifier = EmailNotifier(email)
    except ValidationError as exc:
        err = exc.errors()[0]
        sub = ".".join(str(p) for p in err["loc"])
        raise ConfigError(file, f"email.{sub}" if sub else "email", err["msg"]) from None
    except EmailConfigError as exc:
        raise ConfigError(file, "email", str(exc)) from None

    return Controllers(config=config, auth=auth, storage=storage, resources=resources,
                       job_types=job_types, notifier=notifier)
