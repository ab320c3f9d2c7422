"""The one client builder (``core.temporal.connect``): what it checks before connecting,
what the client it returns carries, and how it takes new files."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio.service import TLSConfig

from core.settings import Settings, SettingsError
from core.temporal import ReloadingService, connect, load_credentials
from tests.production.conftest import Pki
from tests.production.tls_proxy import TlsProxy


def _settings(**values: object) -> Settings:
    return Settings(**values)  # type: ignore[arg-type]


def _problem(**values: object) -> str:
    with pytest.raises(SettingsError) as err:
        load_credentials(_settings(**values))
    return str(err.value)


def test_plaintext_without_any_setting() -> None:
    credentials = load_credentials(_settings())
    assert credentials.tls is None and credentials.api_key is None


def test_files_are_checked_before_connecting(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    assert _problem(temporal_tls_ca=missing) == \
        f"UWS_TEMPORAL_TLS_CA: the file {missing} does not exist"
    assert _problem(temporal_tls_cert=pki.client_cert) == \
        "UWS_TEMPORAL_TLS_KEY: UWS_TEMPORAL_TLS_CERT is set: the client certificate needs " \
        "both UWS_TEMPORAL_TLS_CERT and UWS_TEMPORAL_TLS_KEY"
    other_cert, other_key = pki.issue_client("another")
    assert _problem(temporal_tls_cert=pki.client_cert, temporal_tls_key=other_key) == \
        f"UWS_TEMPORAL_TLS_KEY: the key in {other_key} does not match the certificate in " \
        f"{pki.client_cert} (UWS_TEMPORAL_TLS_CERT)"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert _problem(temporal_tls_cert=garbage, temporal_tls_key=other_key) == \
        f"UWS_TEMPORAL_TLS_CERT: {garbage} holds no PEM certificate"
    assert _problem(temporal_tls_cert=other_cert, temporal_tls_key=garbage) == \
        f"UWS_TEMPORAL_TLS_KEY: {garbage} holds no PEM private key"
    soon = datetime.now(UTC) + timedelta(days=1)
    future_cert, future_key = pki.issue_client("future", valid_from=soon,
                                               valid_until=soon + timedelta(days=1))
    assert _problem(temporal_tls_cert=future_cert, temporal_tls_key=future_key).startswith(
        f"UWS_TEMPORAL_TLS_CERT: the certificate CN=uws-future in {future_cert} is not "
        "valid before ")
    server_cert = pki.dir / "server.pem"
    assert _problem(temporal_tls_cert=server_cert,
                    temporal_tls_key=pki.dir / "server-key.pem") == \
        f"UWS_TEMPORAL_TLS_CERT: the certificate in {server_cert} is not for client " \
        "authentication (its extended key usage lacks clientAuth)"


def test_tls_off_conflicts_with_tls_settings(pki: Pki) -> None:
    assert _problem(temporal_tls=False, temporal_tls_ca=pki.ca_file) == \
        "UWS_TEMPORAL_TLS: it is off, but UWS_TEMPORAL_TLS_CA need TLS (unset " \
        "UWS_TEMPORAL_TLS, or set it on)"


def test_api_key_turns_tls_on_with_system_roots() -> None:
    credentials = load_credentials(_settings(temporal_api_key="k"))
    assert isinstance(credentials.tls, TLSConfig)
    assert credentials.tls.server_root_ca_cert is None  # the system's roots
    assert credentials.api_key == "k"


async def test_api_key_client_carries_it_over_tls(pki: Pki, tls_proxy: TlsProxy,
                                                  tmp_path: Path) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("first-key\n")
    settings = _settings(temporal_address=tls_proxy.address, temporal_tls_ca=pki.ca_file,
                         temporal_tls_server_name="localhost", temporal_api_key_file=key_file)
    client = await connect(settings)
    assert client.api_key == "first-key"
    tls = client.service_client.config.tls
    assert isinstance(tls, TLSConfig) and tls.server_root_ca_cert == pki.ca.pem
    assert tls.domain == "localhost"
    assert await client.service_client.check_health()  # really over the TLS proxy
    # A new key on disk: handed to the live connection, no reconnect needed.
    key_file.write_text("second-key\n")
    service = client.service_client
    assert isinstance(service, ReloadingService)
    assert await service.reload()
    assert client.api_key == "second-key"
    assert await client.service_client.check_health()
    assert not await service.reload()  # nothing new


async def test_api_key_alone_trusts_only_the_system_roots(tls_proxy: TlsProxy) -> None:
    settings = _settings(temporal_address=tls_proxy.address, temporal_api_key="k",
                         temporal_tls_server_name="localhost")
    with pytest.raises(SettingsError) as err:
        await connect(settings)
    assert str(err.value).startswith(
        f"UWS_TEMPORAL_TLS_CA: the certificate of the server at {tls_proxy.address} is not "
        "signed by a CA this system trusts: set UWS_TEMPORAL_TLS_CA to the CA that signed it")


async def test_tls_to_a_plaintext_port_and_back(pki: Pki, temporal_env) -> None:
    plain = temporal_env.client.service_client.config.target_host
    with pytest.raises(SettingsError) as err:
        await connect(_settings(temporal_address=plain, temporal_tls_ca=pki.ca_file))
    assert str(err.value).startswith(f"UWS_TEMPORAL_TLS: the server at {plain} does not "
                                     "answer with TLS")


async def test_wrong_server_name(pki: Pki, mtls_proxy: TlsProxy) -> None:
    settings = _settings(temporal_address=mtls_proxy.address, temporal_tls_ca=pki.ca_file,
                         temporal_tls_cert=pki.client_cert, temporal_tls_key=pki.client_key,
                         temporal_tls_server_name="temporal.example.org")
    with pytest.raises(SettingsError) as err:
        await connect(settings)
    assert str(err.value).startswith(
        f"UWS_TEMPORAL_TLS_SERVER_NAME: the certificate of the server at "
        f"{mtls_proxy.address} is not valid for 'temporal.example.org'")


async def test_silent_server_is_a_bounded_wait(pki: Pki) -> None:
    """A port that accepts and never answers (a TLS client at a stuck server)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        settings = _settings(temporal_address=address, temporal_tls_ca=pki.ca_file,
                             temporal_connect_timeout_seconds=1)
        with pytest.raises(SettingsError) as err:
            await connect(settings)
    assert str(err.value) == (f"UWS_TEMPORAL_ADDRESS: no answer from {address} within 1s "
                              "(is TLS on at one end only?)")


async def test_broken_new_version_keeps_the_connection(pki: Pki, mtls_proxy: TlsProxy,
                                                       tmp_path: Path, caplog) -> None:
    cert, key = pki.client.write(tmp_path, "client")
    settings = _settings(temporal_address=mtls_proxy.address, temporal_tls_ca=pki.ca_file,
                         temporal_tls_cert=cert, temporal_tls_key=key,
                         temporal_tls_server_name="localhost")
    client = await connect(settings)
    service = client.service_client
    assert isinstance(service, ReloadingService)
    # Half a rotation: a new certificate, still the old key.
    pki.ca.issue("uws-half").write(tmp_path, "half")
    (tmp_path / "half.pem").replace(cert)
    assert not await service.reload()
    assert "does not match the certificate" in caplog.text
    assert await client.service_client.check_health()  # the old connection still serves
    # The rotation completes: the new pair is taken.
    renewed = pki.ca.issue("uws-whole")
    renewed.write(tmp_path, "client")
    assert await service.reload()
    assert service.credentials.client_cert == renewed.cert
    assert renewed.serial in mtls_proxy.accepted_serials
    assert await client.service_client.check_health()
