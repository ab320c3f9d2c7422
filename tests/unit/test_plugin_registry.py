"""Plugins are found through the ``uws.controllers`` entry points: the built-ins so, and a
site's own package the same way, installed beside us (here: a distribution's metadata on
``sys.path``, as pip leaves it), with no change to our code."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import tomli_w

from controllers.base import AuthMethod, ComputeResource, JobType, StorageMethod
from controllers.registry import build_controllers, plugin_classes
from core.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]

SITE_PLUGIN = '''
from controllers.job_types.local_test import LocalTestJob
from controllers.resources.local import LocalResource


class SiteResource(LocalResource):
    """A site's own resource."""


class NotAPlugin:
    pass
'''


@pytest.fixture
def site_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``site_plugins`` installed: its module and a dist-info naming three entry points
    (one of them in a module that does not exist)."""
    packages = tmp_path / "site-packages"
    (packages / "site_plugins").mkdir(parents=True)
    (packages / "site_plugins" / "__init__.py").write_text(SITE_PLUGIN)
    info = packages / "site_plugins-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: site-plugins\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[uws.controllers]\nSiteResource = site_plugins:SiteResource\n"
        "NotAPlugin = site_plugins:NotAPlugin\n"
        "Broken = site_plugins.missing:Broken\n")
    monkeypatch.syspath_prepend(str(packages))
    return packages


def _config_with_resource(tmp_path: Path, resource_type: str) -> Path:
    data = tomllib.loads((ROOT / "config.toml").read_text())
    data["available_resources"]["local_resource"]["resource_type"] = resource_type
    path = tmp_path / "site.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def test_the_built_ins_are_entry_points() -> None:
    assert set(plugin_classes(AuthMethod)) == {
        "LocalUserAuthentication", "GlobusUserAuthentication", "OIDCUserAuthentication"}
    assert set(plugin_classes(StorageMethod)) == {"LocalFileSystemStorage"}
    assert set(plugin_classes(ComputeResource)) == {"LocalResource", "SlurmResource"}
    assert set(plugin_classes(JobType)) == {
        "JupyterLabJob", "AppyterJob", "BatchScriptJob", "LocalTestJob"}


def test_a_sites_own_plugin_is_found_and_built(site_package: Path, tmp_path: Path) -> None:
    path = _config_with_resource(tmp_path, "SiteResource")
    controllers = build_controllers(load_config(path), file=str(path), data_dir=tmp_path)
    resource = controllers.main_resource
    assert type(resource).__name__ == "SiteResource"
    assert type(resource).__module__ == "site_plugins"
    assert "SiteResource" in plugin_classes(ComputeResource)


def test_an_entry_point_of_the_wrong_kind_is_refused_by_name(site_package: Path,
                                                           tmp_path: Path) -> None:
    path = _config_with_resource(tmp_path, "NotAPlugin")
    with pytest.raises(ConfigError) as info:
        build_controllers(load_config(path), file=str(path), data_dir=tmp_path)
    assert info.value.key_path == "available_resources.local_resource.resource_type"
    assert "not a resource plugin" in info.value.reason
    assert "site_plugins:NotAPlugin" in info.value.reason


def test_an_unknown_name_lists_what_is_there(tmp_path: Path) -> None:
    path = _config_with_resource(tmp_path, "NoSuchResource")
    with pytest.raises(ConfigError) as info:
        build_controllers(load_config(path), file=str(path), data_dir=tmp_path)
    assert "unknown plugin 'NoSuchResource'" in info.value.reason
    assert "LocalResource, SlurmResource" in info.value.reason


def test_a_plugin_that_does_not_load_fails_only_a_config_naming_it(site_package: Path,
                                                                  tmp_path: Path) -> None:
    assert "LocalResource" in plugin_classes(ComputeResource)  # the rest still listed
    path = _config_with_resource(tmp_path, "Broken")
    with pytest.raises(ConfigError) as info:
        build_controllers(load_config(path), file=str(path), data_dir=tmp_path)
    assert info.value.key_path == "available_resources.local_resource.resource_type"
    assert "'Broken' (site_plugins.missing:Broken) does not load" in info.value.reason
    assert "ModuleNotFoundError" in info.value.reason
