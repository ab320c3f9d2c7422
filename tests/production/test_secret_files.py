"""Secrets mounted as files (``<NAME>_FILE``), as container platforms do, used for real:
the SMTP login, the Slurm token, the server's signing key."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from controllers.notify.email import EmailConfigError, EmailNotifier
from controllers.resources.slurm.tokens import TokenSource
from core.secret_key import load_secret_key
from core.settings import Settings
from tests.unit.test_email_notifier import (  # the same real SMTP server, with a login
    PASSWORD,
    USER,
    Server,
    invitation,
    one_user,
    run_server,
    settings,
)


@pytest.fixture
def auth_server() -> Iterator[Server]:
    yield from run_server(authenticator=one_user, auth_require_tls=False)


async def test_smtp_password_from_a_file(auth_server: Server, tmp_path: Path) -> None:
    password = tmp_path / "smtp-password"
    password.write_text(PASSWORD + "\n")
    env = {"UWS_TEST_SMTP_USER": USER, "UWS_TEST_SMTP_PASSWORD_FILE": str(password)}
    notifier = EmailNotifier(settings(auth_server.port, username_env="UWS_TEST_SMTP_USER",
                                      password_env="UWS_TEST_SMTP_PASSWORD"), environ=env)
    assert await notifier.send_invitation(invitation()) is True
    assert len(auth_server.recorder.envelopes) == 1


def test_smtp_password_file_missing_is_a_config_error(tmp_path: Path) -> None:
    env = {"U": USER, "P_FILE": str(tmp_path / "none")}
    with pytest.raises(EmailConfigError, match=r"^e-mail: P_FILE: the file .*/none does not "
                                               r"exist \(named by password_env\)$"):
        EmailNotifier(settings(25, username_env="U", password_env="P"), environ=env)


def test_slurm_token_file_is_read_at_every_use(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "slurm-token"
    token.write_text("first.jwt.token\n")
    monkeypatch.delenv("UWS_TEST_SLURM_JWT", raising=False)
    monkeypatch.setenv("UWS_TEST_SLURM_JWT_FILE", str(token))
    source = TokenSource(key_file=None, env_var="UWS_TEST_SLURM_JWT", lifespan_s=3600)
    assert source.token_for("root") == "first.jwt.token"
    token.write_text("renewed.jwt.token\n")  # a sidecar renewed it
    assert source.token_for("root") == "renewed.jwt.token"
    token.unlink()
    with pytest.raises(RuntimeError, match=r"UWS_TEST_SLURM_JWT_FILE: the file .* does not exist"):
        source.token_for("root")


def test_signing_key_from_a_file(tmp_path: Path) -> None:
    key = tmp_path / "secret-key"
    key.write_text("shared-by-every-api-replica\n")
    assert load_secret_key(Settings(secret_key_file=key, data_dir=tmp_path)) == \
        b"shared-by-every-api-replica"
    assert not (tmp_path / "secret_key").exists()  # nothing generated
