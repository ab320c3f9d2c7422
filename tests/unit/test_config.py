"""``config.toml`` loading: the shipped file is valid; each kind of mistake names the file,
the key path and the reason."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
import tomli_w
from pydantic import ValidationError

from controllers.registry import build_controllers
from core.config import ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]


def _default() -> dict:
    return tomllib.loads((ROOT / "config.toml").read_text())


def _error(data: dict, tmp_path: Path) -> ConfigError:
    path = tmp_path / "bad.toml"
    path.write_text(tomli_w.dumps(data))
    with pytest.raises(ConfigError) as info:
        config = load_config(path)
        build_controllers(config, file=str(path), data_dir=tmp_path)
    assert str(path) in str(info.value)
    return info.value


def test_shipped_config_builds(tmp_path: Path) -> None:
    config = load_config(ROOT / "config.toml")
    controllers = build_controllers(config, file="config.toml", data_dir=tmp_path)
    assert set(controllers.job_types) == {"jupyter_lab", "local_test_job"}
    assert [p.variable_name for p in config.parameters] == [
        "num_cpus", "memory_mb", "time_limit_min", "gpu_enabled"]
    assert controllers.main_storage.root_dir == str((tmp_path / "workspaces").resolve())


def test_missing_key(tmp_path: Path) -> None:
    data = _default()
    del data["available_storage"]["local_storage"]["storage_type"]
    err = _error(data, tmp_path)
    assert err.key_path == "available_storage.local_storage.storage_type"
    assert "required" in err.reason.lower()


def test_unknown_key(tmp_path: Path) -> None:
    data = _default()
    data["main_storgae"] = "x"
    assert _error(data, tmp_path).key_path == "main_storgae"


def test_dangling_reference(tmp_path: Path) -> None:
    data = _default()
    data["available_resources"]["local_resource"]["storage"] = "elsewhere"
    err = _error(data, tmp_path)
    assert err.key_path == "available_resources.local_resource.storage"
    assert "'elsewhere'" in err.reason


def test_unknown_plugin(tmp_path: Path) -> None:
    data = _default()
    data["available_job_types"]["local_test_job"]["job_type"] = "NoSuchJob"
    err = _error(data, tmp_path)
    assert err.key_path == "available_job_types.local_test_job.job_type"
    assert "NoSuchJob" in err.reason and "LocalTestJob" in err.reason


def test_wrong_plugin_setting(tmp_path: Path) -> None:
    data = _default()
    data["available_user_authentication"]["local_auth"]["connection_details"]["single_usr"] = 1
    err = _error(data, tmp_path)
    assert err.key_path == "available_user_authentication.local_auth.connection_details.single_usr"


def test_wrong_type_in_plugin_setting(tmp_path: Path) -> None:
    data = _default()
    data["available_job_types"]["local_test_job"]["environment_details"]["local_resource"] = {
        "duration_seconds": "long"}
    err = _error(data, tmp_path)
    assert err.key_path == ("available_job_types.local_test_job.environment_details."
                            "local_resource.duration_seconds")


def test_parameter_validation_type(tmp_path: Path) -> None:
    data = _default()
    data["parameters"][0]["validation"]["type"] = "integer"
    assert _error(data, tmp_path).key_path == "parameters.0.validation.type"


def test_max_pending_shares(tmp_path: Path) -> None:
    data = _default()
    assert data["sharing"]["max_pending_per_user"] == 20  # shipped, and the default
    del data["sharing"]["max_pending_per_user"]
    assert parse_config(data, "x.toml").sharing.max_pending_per_user == 20
    for bad in (0, -1, 1.5, "20", True):
        data["sharing"]["max_pending_per_user"] = bad
        error = _error(data, tmp_path)
        assert error.key_path == "sharing.max_pending_per_user", bad


def test_not_toml(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("this is = = not toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_duplicate_parameter() -> None:
    data = _default()
    data["parameters"].append(dict(data["parameters"][0]))
    with pytest.raises(ConfigError) as info:
        parse_config(data, "f.toml")
    assert info.value.key_path == "parameters.4.variable_name"


def test_cli_reports_config_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.toml"
    bad.write_text('api_user_authentication = "x"\n')
    proc = subprocess.run([sys.executable, "-m", "app.cli", "api"], capture_output=True,
                          text=True, env={"UWS_CONFIG": str(bad), "PATH": "/usr/bin:/bin",
                                          "UWS_DATABASE_URL": "postgresql:///unused"},
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert f"configuration error: {bad}: main_storage: Field required" in proc.stderr


def _with_auth_details(**details: object) -> dict:
    data = _default()
    data["available_user_authentication"]["local_auth"]["connection_details"] = details
    return data


SINGLE_USER_GONE = "single_user is no longer supported"


def test_single_user_is_refused(tmp_path: Path) -> None:
    """The old ``single_user = true`` (every user's jobs as one account) stops start-up,
    saying why, instead of being ignored or silently mapped to another mode."""
    err = _error(_with_auth_details(single_user=True, create_external_users=False), tmp_path)
    assert err.key_path.startswith("available_user_authentication.local_auth.connection_details")
    assert "single_user" in str(err)
    assert err.reason.startswith(SINGLE_USER_GONE), err.reason


def test_single_user_false_is_refused_too(tmp_path: Path) -> None:
    """Even ``single_user = false``: the key no longer means anything, so it is named."""
    err = _error(_with_auth_details(single_user=False), tmp_path)
    assert err.reason.startswith(SINGLE_USER_GONE), err.reason


def test_cli_stops_on_single_user(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "old.toml"
    bad.write_text(tomli_w.dumps(_with_auth_details(single_user=True)))
    proc = subprocess.run([sys.executable, "-m", "app.cli", "api"], capture_output=True,
                          text=True, env={"UWS_CONFIG": str(bad), "PATH": "/usr/bin:/bin",
                                          "UWS_DATABASE_URL": "postgresql:///unused",
                                          "UWS_DATA_DIR": str(tmp_path / "data")},
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert f"configuration error: {bad}: available_user_authentication.local_auth." in proc.stderr
    assert f": {SINGLE_USER_GONE}" in proc.stderr, proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="personal mode is only refused for root")
def test_personal_as_root_is_refused(tmp_path: Path) -> None:
    """Personal mode runs every job as the server's account: as root, that is root."""
    err = _error(_with_auth_details(accounts="personal"), tmp_path)
    assert err.key_path == "available_user_authentication.local_auth.connection_details.accounts"
    assert "root" in err.reason and "personal" in err.reason


@pytest.mark.skipif(os.geteuid() != 0, reason="as root, auto means multi_user")
def test_auto_as_root_is_multi_user(tmp_path: Path) -> None:
    config = load_config(ROOT / "config.toml")
    controllers = build_controllers(config, file="config.toml", data_dir=tmp_path)
    assert controllers.api_auth.accounts.mode == "multi_user"
    assert not controllers.api_auth.serves_one_person


# --- secrets from files: each ``*_env`` setting's variable NAME may be NAME_FILE instead ----

def _with_globus(secret_env: str) -> dict:
    data = _default()
    data["available_user_authentication"]["globus"] = {
        "name": "Globus", "user_authentication_type": "GlobusUserAuthentication",
        "connection_details": {"client_id": "uws", "client_secret_env": secret_env}}
    return data


def test_identity_provider_secret_from_a_file(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A container platform mounts the client secret as a file; the plugin (which reads
    its variable) gets it without knowing."""
    secret = tmp_path / "globus-secret"
    secret.write_text("s3cret\n")
    monkeypatch.delenv("UWS_TEST_GLOBUS_SECRET", raising=False)
    monkeypatch.setenv("UWS_TEST_GLOBUS_SECRET_FILE", str(secret))
    config = parse_config(_with_globus("UWS_TEST_GLOBUS_SECRET"), "f.toml")
    controllers = build_controllers(config, file="f.toml", data_dir=tmp_path)
    assert "globus" in controllers.auth
    assert os.environ["UWS_TEST_GLOBUS_SECRET"] == "s3cret"
    # Loading again (the API and the worker in one process) takes a rotated file.
    secret.write_text("rotated\n")
    parse_config(_with_globus("UWS_TEST_GLOBUS_SECRET"), "f.toml")
    assert os.environ["UWS_TEST_GLOBUS_SECRET"] == "rotated"


def test_secret_file_missing_names_the_key_and_variable(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UWS_TEST_SMTP_PASSWORD", raising=False)
    monkeypatch.setenv("UWS_TEST_SMTP_PASSWORD_FILE", str(tmp_path / "none"))
    data = _default()
    data["email"] = {"enabled": False, "username_env": "USER", "password_env":
                     "UWS_TEST_SMTP_PASSWORD"}
    with pytest.raises(ConfigError) as info:
        parse_config(data, "f.toml")
    assert str(info.value) == (f"f.toml: email.password_env: UWS_TEST_SMTP_PASSWORD_FILE: the "
                               f"file {tmp_path / 'none'} does not exist")


def test_secret_and_its_file_both_set_is_refused(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from-file")
    monkeypatch.setenv("UWS_TEST_GLOBUS_SECRET2", "from-env")
    monkeypatch.setenv("UWS_TEST_GLOBUS_SECRET2_FILE", str(secret))
    with pytest.raises(ConfigError) as info:
        parse_config(_with_globus("UWS_TEST_GLOBUS_SECRET2"), "f.toml")
    assert info.value.key_path == \
        "available_user_authentication.globus.connection_details.client_secret_env"
    assert info.value.reason == \
        "set either UWS_TEST_GLOBUS_SECRET2 or UWS_TEST_GLOBUS_SECRET2_FILE, not both"


def test_uws_secret_settings_have_file_twins(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from core.settings import Settings, SettingsError

    for name in ("UWS_DATABASE_URL", "UWS_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)

    key = tmp_path / "secret-key"
    key.write_text("signing-key\n")
    dsn = tmp_path / "dsn"
    dsn.write_text("postgresql://u:pw@db/uws?sslmode=verify-full&sslrootcert=/ca.pem\n")
    settings = Settings(secret_key_file=key, database_url_file=dsn)
    assert settings.secret_key == "signing-key"
    assert settings.database_url == "postgresql://u:pw@db/uws?sslmode=verify-full&" \
                                    "sslrootcert=/ca.pem"
    assert "pw@" not in repr(settings) and "signing-key" not in repr(settings)
    with pytest.raises(ValidationError) as info:
        Settings(secret_key="other", secret_key_file=key)
    cause = info.value.errors()[0]["ctx"]["error"]
    assert isinstance(cause, SettingsError)
    assert str(cause) == ("UWS_SECRET_KEY_FILE: set either UWS_SECRET_KEY or "
                          "UWS_SECRET_KEY_FILE, not both")
    Settings(secret_key="signing-key", secret_key_file=key)  # agreeing: a parent exported it


def test_cli_reports_a_missing_secret_file(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "app.cli", "api"], capture_output=True,
                          text=True, cwd=ROOT, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "UWS_DATABASE_URL": "postgresql:///x",
                               "UWS_SECRET_KEY_FILE": str(tmp_path / "gone")})
    assert proc.returncode == 2
    assert proc.stderr == (f"configuration error: UWS_SECRET_KEY_FILE: the file "
                           f"{tmp_path / 'gone'} does not exist\n")
