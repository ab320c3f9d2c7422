"""EmailNotifier against a real SMTP server (aiosmtpd) on loopback: delivery, AUTH, TLS,
failures, header injection and health. No database or Temporal needed."""

from __future__ import annotations

import email
import email.policy
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword

from controllers.notify.email import (
    EmailConfigError,
    EmailNotifier,
    EmailRejected,
    EmailSendError,
    EmailSettings,
    EmailUnavailable,
    Invitation,
)

HOST = "127.0.0.1"
USER, PASSWORD = "mailer", "s3cret-pw"


def free_port() -> int:
    # Bound then released: nothing listens there afterwards (a "closed port").
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Recorder:
    """aiosmtpd handler keeping every envelope it accepts."""

    envelopes: list[Envelope] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Envelope) -> str:
        self.envelopes.append(envelope)
        return "250 Message accepted for delivery"

    def message(self, index: int = -1) -> EmailMessage:
        raw = self.envelopes[index].original_content or self.envelopes[index].content
        assert isinstance(raw, bytes)
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


def one_user(server: Any, session: Any, envelope: Any, mechanism: str,
             auth_data: Any) -> AuthResult:
    ok = (isinstance(auth_data, LoginPassword) and auth_data.login == USER.encode()
          and auth_data.password == PASSWORD.encode())
    # handled=False: aiosmtpd then answers 535 itself (handled=True would answer nothing).
    return AuthResult(success=ok, handled=False)


@dataclass
class Server:
    port: int
    recorder: Recorder


def run_server(**kwargs: Any) -> Iterator[Server]:
    recorder = Recorder()
    port = free_port()
    controller = Controller(recorder, hostname=HOST, port=port, **kwargs)
    controller.start()
    try:
        yield Server(port, recorder)
    finally:
        controller.stop()


@pytest.fixture
def smtp_server() -> Iterator[Server]:
    yield from run_server()


@pytest.fixture
def auth_server() -> Iterator[Server]:
    yield from run_server(authenticator=one_user, auth_require_tls=False)


def settings(port: int, **overrides: Any) -> EmailSettings:
    values: dict[str, Any] = {"enabled": True, "host": HOST, "port": port,
                              "timeout_seconds": 5, "sender": "User Workspaces <uws@example.org>"}
    return EmailSettings(**(values | overrides))


def invitation(**overrides: Any) -> Invitation:
    values: dict[str, Any] = {
        "recipient_email": "bob@example.org", "recipient_name": "Bob Jones",
        "sharer_name": "Alice Smith", "sharer_email": "alice@example.org",
        "workspace_name": "Cell atlas", "workspace_description": "Notebooks for the atlas.",
        "shared_workspace_id": 42,
    }
    return Invitation(**(values | overrides))


# --- delivery -------------------------------------------------------------------------


async def test_invitation_arrives_with_envelope_headers_and_instructions(
    smtp_server: Server,
) -> None:
    notifier = EmailNotifier(settings(smtp_server.port, portal_url="https://portal.example.org/"))
    assert await notifier.send_invitation(invitation()) is True

    [envelope] = smtp_server.recorder.envelopes
    assert envelope.mail_from == "uws@example.org"
    assert envelope.rcpt_tos == ["bob@example.org"]
    msg = smtp_server.recorder.message()
    assert "Alice Smith" in msg["Subject"] and "Cell atlas" in msg["Subject"]
    assert msg["To"].addresses[0].addr_spec == "bob@example.org"
    assert msg["To"].addresses[0].display_name == "Bob Jones"
    assert msg["From"].addresses[0].addr_spec == "uws@example.org"
    assert msg["Reply-To"].addresses[0].addr_spec == "alice@example.org"
    assert msg["Message-ID"].endswith("@example.org>")
    assert msg["Date"].datetime is not None
    body = msg.get_body(preferencelist=("plain",)).get_content()
    for text in ("Alice Smith", "Cell atlas", "Notebooks for the atlas.", "yours to keep",
                 "https://portal.example.org/", "PUT /shared_workspaces/42/accept/",
                 "decline", "DELETE /shared_workspaces/42/"):
        assert text in body, text
    assert "expires" not in body


async def test_non_ascii_names_round_trip(smtp_server: Server) -> None:
    notifier = EmailNotifier(settings(smtp_server.port))
    inv = invitation(recipient_name="Zoë Ångström-Łukasiewicz", sharer_name="José Müller",
                     workspace_name="Données — été", workspace_description="Überblick ✓")
    await notifier.send_invitation(inv)

    msg = smtp_server.recorder.message()
    to = msg["To"].addresses[0]
    assert (to.display_name, to.addr_spec) == ("Zoë Ångström-Łukasiewicz", "bob@example.org")
    assert "José Müller" in msg["Subject"] and "Données — été" in msg["Subject"]
    body = msg.get_body(preferencelist=("plain",)).get_content()
    assert "Zoë Ångström-Łukasiewicz" in body and "Überblick ✓" in body
    # Headers on the wire stay ASCII (encoded words), the body quoted-printable.
    raw = smtp_server.recorder.envelopes[-1].original_content
    assert raw is not None
    assert raw.split(b"\r\n\r\n", 1)[0].isascii()


def test_render_without_portal_names_the_api_and_the_expiry() -> None:
    notifier = EmailNotifier(EmailSettings())
    expires = datetime(2030, 5, 17, 12, 30, tzinfo=UTC)
    msg = notifier.render_invitation(invitation(shared_workspace_id=7, expires_at=expires))
    body = msg.get_content()
    assert "PUT /shared_workspaces/7/accept/" in body
    assert "2030-05-17 12:30 UTC" in body
    assert msg["From"] == "User Workspaces <uws@localhost>"


def test_newlines_in_workspace_name_are_folded_out_of_the_subject() -> None:
    msg = EmailNotifier(EmailSettings()).render_invitation(
        invitation(workspace_name="two\r\nBcc: eve@example.org"))
    assert "\n" not in msg["Subject"] and "Bcc" not in msg


async def test_disabled_notifier_sends_nothing(smtp_server: Server) -> None:
    notifier = EmailNotifier(settings(smtp_server.port, enabled=False))
    assert await notifier.send_invitation(invitation()) is False
    assert smtp_server.recorder.envelopes == []


# --- authentication -------------------------------------------------------------------


async def test_login_with_credentials_from_named_env_vars(auth_server: Server) -> None:
    env = {"UWS_TEST_SMTP_USER": USER, "UWS_TEST_SMTP_PASSWORD": PASSWORD}
    notifier = EmailNotifier(settings(auth_server.port, username_env="UWS_TEST_SMTP_USER",
                                      password_env="UWS_TEST_SMTP_PASSWORD"), environ=env)
    assert await notifier.send_invitation(invitation()) is True
    assert len(auth_server.recorder.envelopes) == 1


async def test_wrong_password_raises(auth_server: Server,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UWS_TEST_SMTP_USER", USER)
    monkeypatch.setenv("UWS_TEST_SMTP_PASSWORD", "wrong")
    notifier = EmailNotifier(settings(auth_server.port, username_env="UWS_TEST_SMTP_USER",
                                      password_env="UWS_TEST_SMTP_PASSWORD"))
    with pytest.raises(EmailRejected, match="refused the login"):
        await notifier.send_invitation(invitation())
    assert auth_server.recorder.envelopes == []


def test_named_but_missing_env_var_is_a_config_error() -> None:
    with pytest.raises(EmailConfigError, match="UWS_TEST_SMTP_PASSWORD"):
        EmailNotifier(settings(25, username_env="UWS_TEST_SMTP_USER",
                               password_env="UWS_TEST_SMTP_PASSWORD"),
                      environ={"UWS_TEST_SMTP_USER": USER})


def test_unknown_setting_is_rejected() -> None:
    with pytest.raises(ValueError, match="smtp_password"):
        EmailSettings(smtp_password="x")  # type: ignore[call-arg]


# --- failures and input checks --------------------------------------------------------


async def test_unreachable_server_raises_a_clear_error() -> None:
    port = free_port()
    notifier = EmailNotifier(settings(port))
    with pytest.raises(EmailUnavailable, match=f"cannot reach SMTP server {HOST}:{port}") as exc:
        await notifier.send_invitation(invitation())
    assert isinstance(exc.value, EmailSendError) and not exc.value.permanent


@pytest.mark.parametrize("overrides", [
    {"recipient_name": "Bob\r\nBcc: eve@example.org"},
    {"recipient_name": "Bob\nJones"},
    {"recipient_email": "bob@example.org\r\nBcc: eve@example.org"},
    {"recipient_email": "bob@@example.org"},
    {"recipient_email": "bob jones@example.org"},
    {"recipient_email": "bob.example.org"},
])
async def test_unsafe_recipient_raises_value_error(smtp_server: Server,
                                                   overrides: dict[str, str]) -> None:
    notifier = EmailNotifier(settings(smtp_server.port))
    with pytest.raises(ValueError):
        await notifier.send_invitation(invitation(**overrides))
    assert smtp_server.recorder.envelopes == []


# --- health ---------------------------------------------------------------------------


async def test_health_ok_against_running_server(smtp_server: Server) -> None:
    health = await EmailNotifier(settings(smtp_server.port)).health()
    assert health.ok, health.detail


async def test_health_not_ok_against_closed_port() -> None:
    health = await EmailNotifier(settings(free_port())).health()
    assert not health.ok and "cannot reach" in health.detail


async def test_health_when_disabled() -> None:
    health = await EmailNotifier(EmailSettings()).health()
    assert health.ok and health.detail == "e-mail disabled"


# --- TLS (needs the cryptography package for a self-signed certificate) ---------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("cryptography", reason="cryptography not installed: no test cert")
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.now(UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def server_context(cert_and_key: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(*cert_and_key)
    return ctx


@pytest.fixture
def trust_test_cert(self_signed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # ssl.create_default_context() reads SSL_CERT_FILE: the notifier trusts only our cert.
    monkeypatch.setenv("SSL_CERT_FILE", str(self_signed[0]))


@pytest.mark.usefixtures("trust_test_cert")
async def test_starttls_with_login(self_signed: tuple[Path, Path]) -> None:
    for server in run_server(tls_context=server_context(self_signed), require_starttls=True,
                             authenticator=one_user):
        env = {"U": USER, "P": PASSWORD}
        notifier = EmailNotifier(settings(server.port, security="starttls",
                                          username_env="U", password_env="P"), environ=env)
        assert (await notifier.health()).ok
        assert await notifier.send_invitation(invitation()) is True
        assert server.recorder.envelopes[0].rcpt_tos == ["bob@example.org"]


@pytest.mark.usefixtures("trust_test_cert")
async def test_implicit_tls(self_signed: tuple[Path, Path]) -> None:
    for server in run_server(ssl_context=server_context(self_signed)):
        notifier = EmailNotifier(settings(server.port, security="tls"))
        assert await notifier.send_invitation(invitation()) is True
        assert len(server.recorder.envelopes) == 1


async def test_starttls_against_untrusted_cert_fails(self_signed: tuple[Path, Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", "/nonexistent")
    for server in run_server(tls_context=server_context(self_signed), require_starttls=True):
        notifier = EmailNotifier(settings(server.port, security="starttls"))
        with pytest.raises(EmailSendError, match="TLS"):
            await notifier.send_invitation(invitation())
        assert server.recorder.envelopes == []
