"""Connecting to Temporal, and the search attributes our workflows carry.

``connect`` is the one way every process (API, worker and its schedules, CLI) gets a
client: plaintext for the dev server; TLS, mTLS or an API key for a production cluster.
The certificate, key, CA and API key files are validated before any connection (a missing
file, a key that is not the certificate's, an expired certificate each stop start-up with
the variable's name), every connection attempt is bounded, and a refusal by the server is
explained in terms of the setting to fix.

Short-lived certificates (cert-manager, Vault) rotate without a restart: with files
configured, the client's service is a ``ReloadingService`` whose connection is replaced by
a fresh one when the files change (``credentials_reloaded`` checks them), so the one
``Client`` object every part of the process holds keeps working; a worker is handed the
new connection through ``Worker.client``, the SDK's way to replace a worker's client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import google.protobuf.message
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from temporalio.client import Client
from temporalio.runtime import Runtime
from temporalio.service import (
    RPCError,
    RPCStatusCode,
    ServiceClient,
    ServiceResponse,
    TLSConfig,
    _BridgeServiceClient,
)

from core.background import running
from core.settings import Settings, SettingsError, read_secret_file

log = logging.getLogger("uws.temporal")

# name -> type, as `temporal operator search-attribute create` and the dev server take them.
SEARCH_ATTRIBUTES: dict[str, str] = {
    "UwsJobId": "Int",
    "UwsUserId": "Int",
    "UwsWorkspaceId": "Int",
    "UwsJobType": "Keyword",
    "UwsResource": "Keyword",
    "UwsStatus": "Keyword",
}

CA, CERT, KEY = "UWS_TEMPORAL_TLS_CA", "UWS_TEMPORAL_TLS_CERT", "UWS_TEMPORAL_TLS_KEY"
TLS, SERVER_NAME = "UWS_TEMPORAL_TLS", "UWS_TEMPORAL_TLS_SERVER_NAME"
API_KEY, ADDRESS = "UWS_TEMPORAL_API_KEY", "UWS_TEMPORAL_ADDRESS"


class TemporalConnectError(SettingsError):
    """Temporal could not be reached, or refused us, with the settings given."""


_attempts = 0  # connections tried by this process (see ``tried_to_connect``)


def tried_to_connect() -> bool:
    """Whether this process has started the SDK's Rust client: its threads can outlive the
    interpreter and crash its teardown (temporalio/sdk-python#300)."""
    return _attempts > 0


@dataclass(frozen=True)
class Credentials:
    """What one connection is made with, read and checked from the settings' files."""

    tls: TLSConfig | None  # None: plaintext
    api_key: str | None
    client_cert: x509.Certificate | None
    tls_digest: str  # of the TLS files' contents: a new version means a new connection

    def describe(self) -> str:
        if self.tls is None:
            return "plaintext"
        parts = ["TLS"]
        if self.client_cert is not None:
            c = self.client_cert
            until = f"{c.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            parts.append(f"client certificate {c.subject.rfc4514_string()} (serial "
                         f"{c.serial_number:x}, valid until {until})")
        if self.api_key:
            parts.append("API key")
        return ", ".join(parts)


def _read_file(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SettingsError(variable, f"the file {path} does not exist") from None
    except OSError as exc:
        raise SettingsError(variable, f"cannot read the file {path} ({exc.strerror})") from None


def _certificates(data: bytes, path: Path, variable: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise SettingsError(variable, f"{path} holds no PEM certificate")
    return certs


def _check_validity(cert: x509.Certificate, path: Path, variable: str,
                    now: datetime) -> None:
    name = cert.subject.rfc4514_string()
    if cert.not_valid_after_utc <= now:
        raise SettingsError(variable, f"the certificate {name} in {path} expired at "
                                      f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if cert.not_valid_before_utc > now:
        raise SettingsError(variable, f"the certificate {name} in {path} is not valid before "
                                      f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _client_pair(settings: Settings, now: datetime) -> tuple[bytes, bytes, x509.Certificate]:
    cert_path, key_path = settings.temporal_tls_cert, settings.temporal_tls_key
    assert cert_path is not None and key_path is not None
    cert_pem, key_pem = _read_file(cert_path, CERT), _read_file(key_path, KEY)
    leaf = _certificates(cert_pem, cert_path, CERT)[0]
    _check_validity(leaf, cert_path, CERT, now)
    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None
    if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        raise SettingsError(CERT, f"the certificate in {cert_path} is not for client "
                                  "authentication (its extended key usage lacks clientAuth)")
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise SettingsError(KEY, f"the key in {key_path} is encrypted: give it "
                                 "unencrypted (protect the file instead)") from None
    except ValueError:
        raise SettingsError(KEY, f"{key_path} holds no PEM private key") from None
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise SettingsError(KEY, f"the key in {key_path} does not match the certificate "
                                 f"in {cert_path} ({CERT})")
    return cert_pem, key_pem, leaf


def load_credentials(settings: Settings) -> Credentials:
    """Read and check every TLS and API key setting; a ``SettingsError`` names the first
    one that cannot work. Files are read afresh on each call (rotation)."""
    now = datetime.now(UTC)
    api_key = settings.temporal_api_key
    if settings.temporal_api_key_file is not None:
        api_key = read_secret_file(settings.temporal_api_key_file, f"{API_KEY}_FILE")
    cert, key = settings.temporal_tls_cert, settings.temporal_tls_key
    if (cert is None) != (key is None):
        given, missing = (CERT, KEY) if key is None else (KEY, CERT)
        raise SettingsError(missing, f"{given} is set: the client certificate needs both "
                                     f"{CERT} and {KEY}")
    wants_tls = [name for name, value in ((CA, settings.temporal_tls_ca), (CERT, cert),
                                          (SERVER_NAME, settings.temporal_tls_server_name),
                                          (API_KEY, api_key)) if value]
    if settings.temporal_tls is False and wants_tls:
        raise SettingsError(TLS, f"it is off, but {' and '.join(wants_tls)} need TLS "
                                 f"(unset {TLS}, or set it on)")
    if not (settings.temporal_tls or wants_tls):
        return Credentials(tls=None, api_key=None, client_cert=None, tls_digest="")
    digest = hashlib.sha256()
    ca_pem = None
    if settings.temporal_tls_ca is not None:
        ca_pem = _read_file(settings.temporal_tls_ca, CA)
        for ca_cert in _certificates(ca_pem, settings.temporal_tls_ca, CA):
            _check_validity(ca_cert, settings.temporal_tls_ca, CA, now)
        digest.update(ca_pem)
    cert_pem = key_pem = leaf = None
    if cert is not None:
        cert_pem, key_pem, leaf = _client_pair(settings, now)
        digest.update(b"\0" + cert_pem + b"\0" + key_pem)
    tls = TLSConfig(server_root_ca_cert=ca_pem, client_cert=cert_pem,
                    client_private_key=key_pem, domain=settings.temporal_tls_server_name)
    return Credentials(tls=tls, api_key=api_key or None, client_cert=leaf,
                       tls_digest=digest.hexdigest())


def _has_files(settings: Settings) -> bool:
    return any(path is not None for path in (settings.temporal_tls_ca, settings.temporal_tls_cert,
                                              settings.temporal_api_key_file))


async def connect(settings: Settings, runtime: Runtime | None = None) -> Client:
    """The client for this process; ``runtime`` carries telemetry (the worker's metrics),
    default: the SDK's. Raises ``SettingsError`` (``TemporalConnectError`` when the server
    could not be reached or refused us), never waits past the connect timeout."""
    credentials = load_credentials(settings)
    client = await _connect(settings, credentials, runtime)
    log.info("connected to Temporal at %s (%s)", settings.resolved_temporal_address,
             credentials.describe())
    if not _has_files(settings):
        return client
    service = ReloadingService(client.service_client, settings, credentials, runtime)
    return Client(service, namespace=settings.temporal_namespace)


async def _connect(settings: Settings, credentials: Credentials,
                   runtime: Runtime | None) -> Client:
    global _attempts
    _attempts += 1
    timeout = settings.temporal_connect_timeout_seconds
    address = settings.resolved_temporal_address
    try:
        return await asyncio.wait_for(Client.connect(
            address, namespace=settings.temporal_namespace, api_key=credentials.api_key,
            tls=credentials.tls or False, connect_timeout=timedelta(seconds=timeout),
            runtime=runtime,
        ), timeout)
    except TimeoutError:
        raise TemporalConnectError(ADDRESS, f"no answer from {address} within {timeout:g}s "
                                            "(is TLS on at one end only?)") from None
    except Exception as exc:  # the core's errors are RuntimeErrors carrying rustls' words
        raise _explain(exc, settings, credentials) from None


# What rustls and gRPC say, and what it means for the settings (checked in this order).
_SERVER_CERT_UNTRUSTED = ("UnknownIssuer", "BadSignature")
_WRONG_NAME = ("NotValidForName",)
_SERVER_CERT_EXPIRED = ("InvalidCertificate(Expired",)
_NOT_TLS = ("InvalidContentType", "CorruptMessage", "InvalidMessage")
_CLIENT_CERT_REFUSED = ("UnknownCA", "BadCertificate", "CertificateUnknown", "AccessDenied",
                        "CertificateRevoked", "CertificateExpired", "UnsupportedCertificate",
                        "DecryptError")
_CLIENT_CERT_WANTED = ("CertificateRequired",)
# The connection ended at the first call after the handshake. In TLS 1.3 the server judges
# a client certificate only then, and its alert races with our first write: the client
# sees the alert, a broken pipe or a reset, so these count alike.
_CALL_AFTER_CONNECTING = "after connection"
_CUT = ("transport error", "operation was canceled")
# gRPC statuses of a server that took the connection but not who we are (an API key).
_CREDENTIALS_REFUSED = ("code: Unauthenticated", "code: PermissionDenied")


def _explain(exc: Exception, settings: Settings, credentials: Credentials) -> TemporalConnectError:
    text = str(exc)
    address = settings.resolved_temporal_address
    said = f" (Temporal client: {text})"

    def has(words: tuple[str, ...]) -> bool:
        return any(word in text for word in words)

    if (isinstance(exc, RPCError) and exc.status in (RPCStatusCode.UNAUTHENTICATED,
                                                     RPCStatusCode.PERMISSION_DENIED)) \
            or has(_CREDENTIALS_REFUSED):
        variable = API_KEY if credentials.api_key else CERT
        return TemporalConnectError(variable, f"the server at {address} refused our "
                                              f"credentials{said}")
    if has(_SERVER_CERT_UNTRUSTED):
        if settings.temporal_tls_ca is not None:
            why = f"is not signed by the CA in {settings.temporal_tls_ca}"
        else:
            why = f"is not signed by a CA this system trusts: set {CA} to the CA that signed it"
        return TemporalConnectError(CA, f"the certificate of the server at {address} {why}{said}")
    if has(_WRONG_NAME):
        name = settings.temporal_tls_server_name or address.rpartition(":")[0]
        return TemporalConnectError(SERVER_NAME, f"the certificate of the server at {address} "
                                                 f"is not valid for {name!r}: set {SERVER_NAME} "
                                                 f"to a name it carries{said}")
    if has(_SERVER_CERT_EXPIRED):
        return TemporalConnectError(ADDRESS, f"the certificate of the server at {address} "
                                             f"has expired{said}")
    if has(_NOT_TLS):
        return TemporalConnectError(TLS, f"the server at {address} does not answer with TLS "
                                         f"(is it a plaintext port?){said}")
    cut = _CALL_AFTER_CONNECTING in text and has(_CUT)
    cert = credentials.client_cert
    if credentials.tls is not None and (has(_CLIENT_CERT_WANTED) or (cert is None and (
            has(_CLIENT_CERT_REFUSED) or cut))):
        return TemporalConnectError(CERT, f"the server at {address} closed the connection "
                                          "after the TLS handshake: it requires a client "
                                          f"certificate (set {CERT} and {KEY}){said}")
    if credentials.tls is not None and cert is not None and (has(_CLIENT_CERT_REFUSED) or cut):
        return TemporalConnectError(CERT, f"the server at {address} did not accept the client "
                                          f"certificate in {settings.temporal_tls_cert} "
                                          f"(issued by {cert.issuer.rfc4514_string()}): it "
                                          f"ended the connection after the TLS "
                                          f"handshake{said}")
    if credentials.tls is None and _CALL_AFTER_CONNECTING in text:
        return TemporalConnectError(TLS, f"the server at {address} closed the connection: "
                                         f"does it want TLS ({TLS}=on)?{said}")
    return TemporalConnectError(ADDRESS, f"cannot connect to Temporal at {address}{said}")


class ReloadingService(ServiceClient):
    """A service client whose connection can be replaced under the ``Client`` that holds
    it: calls already made finish on the old connection, new ones take the new one. A
    worker reads ``worker_service_client`` when it is (re)given the client."""

    def __init__(self, inner: ServiceClient, settings: Settings, credentials: Credentials,
                 runtime: Runtime | None) -> None:
        super().__init__(inner.config)
        self._inner = inner
        self._settings = settings
        self.credentials = credentials
        self._runtime = runtime
        self._last_problem = ""

    @property
    def worker_service_client(self) -> _BridgeServiceClient:
        return self._inner.worker_service_client

    def update_rpc_metadata(self, metadata: Mapping[str, str | bytes]) -> None:
        self._inner.update_rpc_metadata(metadata)

    def update_api_key(self, api_key: str | None) -> None:
        self._inner.update_api_key(api_key)

    async def _rpc_call(self, rpc: str, req: google.protobuf.message.Message,
                        resp_type: type[ServiceResponse], *, service: str, retry: bool,
                        metadata: Mapping[str, str | bytes],
                        timeout: timedelta | None) -> ServiceResponse:
        return await self._inner._rpc_call(rpc, req, resp_type, service=service, retry=retry,
                                           metadata=metadata, timeout=timeout)

    async def reload(self) -> bool:
        """Read the files again; on a new certificate, key or CA, connect with them and
        switch over; on a new API key, hand it to the connection. True when something
        changed. A half-written or broken new version is logged and the current
        connection kept, to be tried again at the next check."""
        try:
            fresh = load_credentials(self._settings)
            if fresh.tls_digest != self.credentials.tls_digest:
                client = await _connect(self._settings, fresh, self._runtime)
                self._inner = client.service_client
                self.config = self._inner.config
                log.info("Temporal credentials reloaded: reconnected with %s",
                         fresh.describe())
            elif fresh.api_key != self.credentials.api_key:
                self.config.api_key = fresh.api_key
                self._inner.update_api_key(fresh.api_key)
                log.info("Temporal API key reloaded")
            else:
                return False
        except SettingsError as exc:
            if str(exc) != self._last_problem:  # once per distinct problem, not per check
                log.warning("new Temporal credentials not used yet: %s", exc)
                self._last_problem = str(exc)
            return False
        self.credentials = fresh
        self._last_problem = ""
        return True


@contextlib.asynccontextmanager
async def credentials_reloaded(client: Client,
                               on_reconnect: Callable[[], None] | None = None,
                               ) -> AsyncIterator[None]:
    """While inside, check the credential files every ``UWS_TEMPORAL_RELOAD_SECONDS``
    and switch ``client`` to new ones; ``on_reconnect`` runs after each new connection
    (a worker re-takes the client there). Nothing to do for a client without files."""
    service = client.service_client
    if not isinstance(service, ReloadingService):
        yield
        return

    async def watch() -> None:
        while True:
            await asyncio.sleep(service._settings.temporal_reload_seconds)
            digest = service.credentials.tls_digest
            if await service.reload() and service.credentials.tls_digest != digest \
                    and on_reconnect is not None:
                try:
                    on_reconnect()
                except Exception:  # the next rotation must still be watched for
                    log.exception("handing the new Temporal connection over failed")

    async with running(watch(), name="temporal-credentials"):
        yield
