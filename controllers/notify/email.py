"""E-mail notifications: the invitation a recipient gets when a workspace is shared with them.

Sent with the standard library's ``smtplib`` in a thread, so no runtime dependency is added.
Like the other plugins this knows nothing of HTTP or Temporal: the activity that calls
``send_invitation`` decides what to retry. Failures are split so it can: ``EmailUnavailable``
(the server could not be reached, or answered 4xx: retrying may work) and ``EmailRejected``
(5xx, a refused login, a missing extension: the same message will fail again). Both derive
from ``EmailSendError``; neither should ever fail the share itself.

Secrets never live in the config: the settings name the environment variables holding them
(or, as ``<NAME>_FILE``, the files holding them: mounted container secrets).
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime
from email.errors import MessageError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from typing import ClassVar, Literal

from pydantic import BaseModel, Field, field_validator

from controllers.base import Health, PluginSettings
from controllers.errors import BackendError, ControllerError, Unavailable
from core.settings import SettingsError, secret_from_env

# Health checks answer quickly even when sending may wait longer.
HEALTH_TIMEOUT_S = 5.0


class EmailSettings(PluginSettings):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    security: Literal["none", "starttls", "tls"] = "none"  # tls = implicit TLS (SMTPS)
    username_env: str = ""  # NAME of the environment variable holding the username
    password_env: str = ""  # NAME of the environment variable holding the password
    sender: str = "User Workspaces <uws@localhost>"
    timeout_seconds: float = Field(default=30.0, gt=0)
    portal_url: str = ""  # where recipients accept shares; named in the message when set

    @field_validator("sender")
    @classmethod
    def _sender_is_an_address(cls, value: str) -> str:
        # Fail when the config is loaded, not at the first share.
        _check_single_line("sender", value)
        _check_address("sender", parseaddr(value)[1])
        return value


class Invitation(BaseModel):
    recipient_email: str
    recipient_name: str
    sharer_name: str
    sharer_email: str
    workspace_name: str
    workspace_description: str = ""
    shared_workspace_id: int
    expires_at: datetime | None = None


class EmailConfigError(ValueError):
    """The settings cannot work as given (a named environment variable is unset, say)."""


class EmailSendError(ControllerError):
    """Sending failed. ``permanent`` tells whether retrying the same message can help."""

    permanent: ClassVar[bool] = False


class EmailUnavailable(EmailSendError, Unavailable):
    """The server could not be reached or answered 4xx: retrying later may work."""


class EmailRejected(EmailSendError, BackendError):
    """The server refused for good (5xx, a refused login, a missing extension)."""

    permanent = True


def _check_single_line(field: str, value: str) -> None:
    # CR/LF in a header value would let the value add headers of its own.
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{field} must not contain CR, LF or other control characters")


def _check_address(field: str, value: str) -> Address:
    _check_single_line(field, value)
    local, _, domain = value.partition("@")
    if value.count("@") != 1 or not local or not domain or any(c.isspace() for c in value):
        raise ValueError(f"{field} {value!r} is not an e-mail address (user@domain, no spaces)")
    try:
        return Address(addr_spec=value)
    except (ValueError, MessageError) as exc:  # the parser raises either
        raise ValueError(f"{field} {value!r} is not a valid e-mail address: {exc}") from None


def _one_line(value: str) -> str:
    # User-chosen text (a workspace name) may hold newlines; a subject must not.
    return " ".join(value.split())


def _format_expiry(when: datetime) -> str:
    aware = when if when.tzinfo else when.replace(tzinfo=UTC)  # naive means UTC here
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _read_env(environ: Mapping[str, str], var: str, setting: str) -> str:
    try:
        value = secret_from_env(var, environ)
    except SettingsError as exc:
        raise EmailConfigError(f"e-mail: {exc} (named by {setting})") from None
    if not value:
        raise EmailConfigError(
            f"e-mail: environment variable {var!r} (named by {setting}) is not set or empty "
            f"(nor {var}_FILE)"
        )
    return value


def _classify(exc: Exception, where: str) -> EmailSendError:
    """Turn an smtplib/socket failure into a retryable or a permanent error."""
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        return EmailRejected(f"SMTP server {where} refused the login: {_reply(exc)}")
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        return EmailRejected(f"SMTP server {where} lacks a needed extension: {exc}")
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        detail = "; ".join(f"{r}: {c} {m.decode(errors='replace')}"
                           for r, (c, m) in exc.recipients.items())
        cls = EmailRejected if all(c >= 500 for c in codes) else EmailUnavailable
        return cls(f"SMTP server {where} refused the recipient: {detail}")
    if isinstance(exc, smtplib.SMTPResponseException):
        cls = EmailRejected if exc.smtp_code >= 500 else EmailUnavailable
        return cls(f"SMTP server {where} answered {_reply(exc)}")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return EmailUnavailable(f"SMTP server {where} closed the connection: {exc}")
    if isinstance(exc, ssl.SSLError):
        return EmailUnavailable(f"TLS with SMTP server {where} failed: {exc}")
    if isinstance(exc, TimeoutError):
        return EmailUnavailable(f"SMTP server {where} did not answer in time")
    if isinstance(exc, OSError):
        return EmailUnavailable(f"cannot reach SMTP server {where}: {exc}")
    return EmailUnavailable(f"sending through SMTP server {where} failed: {exc!r}")


def _reply(exc: smtplib.SMTPResponseException) -> str:
    msg = exc.smtp_error
    text = msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)
    return f"{exc.smtp_code} {text}"


class EmailNotifier:
    """Renders and sends invitation e-mails through one SMTP server."""

    def __init__(self, settings: EmailSettings, environ: Mapping[str, str] | None = None) -> None:
        self.settings = settings
        env = os.environ if environ is None else environ
        self._sender = _check_address("sender", parseaddr(settings.sender)[1])
        self._credentials = self._read_credentials(env) if settings.enabled else None

    def _read_credentials(self, env: Mapping[str, str]) -> tuple[str, str] | None:
        s = self.settings
        if not s.username_env and not s.password_env:
            return None
        if not s.username_env or not s.password_env:
            raise EmailConfigError("e-mail: name both username_env and password_env, or neither")
        return (_read_env(env, s.username_env, "username_env"),
                _read_env(env, s.password_env, "password_env"))

    @property
    def _where(self) -> str:
        return f"{self.settings.host}:{self.settings.port}"

    # --- rendering ----------------------------------------------------------------------

    def render_invitation(self, inv: Invitation) -> EmailMessage:
        """The invitation as a plain-text message; raises ValueError on unsafe header input."""
        _check_single_line("recipient_name", inv.recipient_name)
        to = _check_address("recipient_email", inv.recipient_email)
        msg = EmailMessage()
        msg["Subject"] = (f"{_one_line(inv.sharer_name)} shared the workspace "
                          f"\u201c{_one_line(inv.workspace_name)}\u201d with you")
        msg["From"] = self.settings.sender
        msg["To"] = Address(display_name=inv.recipient_name, username=to.username,
                            domain=to.domain)
        reply_to = self._reply_to(inv)
        if reply_to is not None:
            msg["Reply-To"] = reply_to
        msg["Date"] = format_datetime(datetime.now(UTC))
        # An explicit domain: make_msgid's default looks up this host's FQDN, which can hang.
        msg["Message-ID"] = make_msgid(domain=self._sender.domain)
        # Quoted-printable: smtplib would send 8-bit text even to servers without 8BITMIME.
        msg.set_content(self._invitation_text(inv), cte="quoted-printable")
        return msg

    @staticmethod
    def _reply_to(inv: Invitation) -> Address | None:
        # Replies should reach the sharer; an odd sharer address only costs the header.
        try:
            addr = _check_address("sharer_email", inv.sharer_email)
            _check_single_line("sharer_name", inv.sharer_name)
        except ValueError:
            return None
        return Address(display_name=inv.sharer_name, username=addr.username,
                       domain=addr.domain)

    def _invitation_text(self, inv: Invitation) -> str:
        sharer = f"{inv.sharer_name} <{inv.sharer_email}>" if inv.sharer_email else inv.sharer_name
        lines = [
            f"Hello {inv.recipient_name}," if inv.recipient_name.strip() else "Hello,",
            "",
            f"{sharer} has shared the workspace \u201c{inv.workspace_name}\u201d with you.",
        ]
        if inv.workspace_description.strip():
            lines += ["", "Description:", *(f"  {ln}" for ln in
                                             inv.workspace_description.strip().splitlines())]
        lines += [
            "",
            "You receive a copy of the workspace that is yours to keep: what you change in it",
            "does not change the original, and later changes to the original do not reach it.",
            "",
            *self._accept_lines(inv.shared_workspace_id),
            "",
            "To decline, delete the share instead of accepting it (in the portal, or through",
            f"the API: DELETE /shared_workspaces/{inv.shared_workspace_id}/).",
        ]
        if inv.expires_at is not None:
            lines += ["", f"This invitation expires on {_format_expiry(inv.expires_at)}."]
        lines += ["", "-- ", "User Workspaces (this message was sent automatically)"]
        return "\n".join(lines) + "\n"

    def _accept_lines(self, shared_workspace_id: int) -> list[str]:
        api = f"PUT /shared_workspaces/{shared_workspace_id}/accept/"
        if self.settings.portal_url:
            return [
                "It appears among your workspaces once you accept it. To accept, open the",
                f"portal at {self.settings.portal_url} and accept the share there",
                f"(or, through the API: {api}).",
            ]
        return [
            "It appears among your workspaces once you accept it. To accept, use your",
            f"portal, or the API: {api}",
        ]

    # --- sending ------------------------------------------------------------------------

    async def send_invitation(self, inv: Invitation) -> bool:
        """Send one invitation; False (nothing sent) when disabled. Raises ValueError on
        unsafe input and ``EmailSendError`` when the server cannot take the message."""
        if not self.settings.enabled:
            return False
        msg = self.render_invitation(inv)
        await asyncio.to_thread(self._send, msg, inv.recipient_email)
        return True

    def _send(self, msg: EmailMessage, recipient: str) -> None:
        try:
            with self._connect(self.settings.timeout_seconds) as smtp:
                if self._credentials is not None:
                    smtp.login(*self._credentials)
                smtp.send_message(msg, from_addr=self._sender.addr_spec, to_addrs=[recipient])
        except (smtplib.SMTPException, OSError) as exc:
            raise _classify(exc, self._where) from exc

    def _connect(self, timeout: float) -> smtplib.SMTP:
        """An open, greeted connection, already under TLS when security asks for it."""
        s = self.settings
        if s.security == "tls":
            smtp: smtplib.SMTP = smtplib.SMTP_SSL(s.host, s.port, timeout=timeout,
                                                  context=ssl.create_default_context())
        else:
            smtp = smtplib.SMTP(s.host, s.port, timeout=timeout)
        try:
            smtp.ehlo()
            if s.security == "starttls":
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()  # capabilities change under TLS (AUTH is often offered only then)
        except BaseException:
            smtp.close()
            raise
        return smtp

    # --- health -------------------------------------------------------------------------

    async def health(self) -> Health:
        """Whether the server answers (connect, TLS as configured, EHLO, NOOP). The login is
        not tried: frequent checks with credentials could lock the account."""
        if not self.settings.enabled:
            return Health(ok=True, detail="e-mail disabled")
        try:
            await asyncio.to_thread(self._probe)
        except EmailSendError as exc:
            return Health(ok=False, detail=str(exc))
        return Health(ok=True, detail=f"SMTP server {self._where} answers")

    def _probe(self) -> None:
        try:
            with self._connect(min(HEALTH_TIMEOUT_S, self.settings.timeout_seconds)) as smtp:
                code, reply = smtp.noop()
                if code != 250:
                    raise smtplib.SMTPResponseException(code, reply)
        except (smtplib.SMTPException, OSError) as exc:
            raise _classify(exc, self._where) from exc
