"""Production wiring against real parts: the session's Temporal dev server behind a TLS
proxy (``tls_proxy``), certificates from a CA made here (``pki``), the ``uws`` commands
as processes."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from tests.conftest import TEST_CONFIG, traversable_dir
from tests.production.pki import CertificateAuthority, Issued
from tests.production.tls_proxy import TlsProxy
from tests.stack import ROOT

# Every `uws` command run here is bounded: a hang fails the test instead of stalling it.
COMMAND_TIMEOUT_S = 90


@dataclass
class Pki:
    """The files a site would mount: CA, server and client certificates, and the odd ones."""

    dir: Path
    ca: CertificateAuthority
    other_ca: CertificateAuthority
    client: Issued

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def other_ca_file(self) -> Path:
        return self.dir / "other-ca.pem"

    @property
    def client_cert(self) -> Path:
        return self.dir / "client.pem"

    @property
    def client_key(self) -> Path:
        return self.dir / "client-key.pem"

    def issue_client(self, stem: str, **kwargs: object) -> tuple[Path, Path]:
        return self.ca.issue(f"uws-{stem}", **kwargs).write(self.dir, stem)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pki() -> Iterator[Pki]:
    path = Path(traversable_dir("uws-pki-"))
    ca, other = CertificateAuthority("uws test CA"), CertificateAuthority("someone else's CA")
    ca.write(path / "ca.pem")
    other.write(path / "other-ca.pem")
    ca.issue("temporal.test", server=True, names=("localhost", "127.0.0.1")).write(path, "server")
    client = ca.issue("uws-worker")
    client.write(path, "client")
    other.issue("uws-worker").write(path, "foreign-client")
    past = datetime.now(UTC) - timedelta(days=2)
    ca.issue("uws-expired", valid_from=past - timedelta(days=1),
             valid_until=past).write(path, "expired-client")
    yield Pki(dir=path, ca=ca, other_ca=other, client=client)
    shutil.rmtree(path, ignore_errors=True)


def temporal_address(env: WorkflowEnvironment) -> str:
    return env.client.service_client.config.target_host


@pytest.fixture(scope="session")
def mtls_proxy(temporal_env: WorkflowEnvironment, pki: Pki) -> Iterator[TlsProxy]:
    """The dev server as a self-hosted cluster with mTLS sees it: client certificates of
    our CA required."""
    proxy = TlsProxy(temporal_address(temporal_env), pki.dir / "server.pem",
                     pki.dir / "server-key.pem", client_ca=pki.ca_file).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="session")
def tls_proxy(temporal_env: WorkflowEnvironment, pki: Pki) -> Iterator[TlsProxy]:
    """TLS without client certificates, as Temporal Cloud's API key endpoints are."""
    proxy = TlsProxy(temporal_address(temporal_env), pki.dir / "server.pem",
                     pki.dir / "server-key.pem", client_ca=None).start()
    yield proxy
    proxy.stop()


def uws_env(database_url: str, data_dir: Path, **settings: str | Path) -> dict[str, str]:
    """The environment of a `uws` process: this machine's database, the test wiring, and
    ``settings`` as ``UWS_<NAME>`` (no ``UWS_*`` of the caller's leaks in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UWS_")}
    env.update({
        "UWS_DATABASE_URL": database_url, "UWS_DATA_DIR": str(data_dir),
        "UWS_CONFIG": str(TEST_CONFIG), "UWS_SECRET_KEY": "production-test-secret",
        "UWS_TASK_QUEUE": f"uws-prod-{secrets.token_hex(4)}", "UWS_TOKEN_CACHE_SECONDS": "0",
    })
    env.update({f"UWS_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def run_uws(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
