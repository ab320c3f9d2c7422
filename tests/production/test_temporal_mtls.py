"""`uws api` and `uws worker` against Temporal over mTLS: a job end to end, a certificate
rotated on disk while they run, and the start-up failures an operator can make."""

from __future__ import annotations

import asyncio
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from tests.conftest import eventually, free_port, traversable_dir
from tests.production.conftest import Pki, run_uws, temporal_address, uws_env
from tests.production.tls_proxy import TlsProxy
from tests.stack import Proc


@dataclass
class MtlsStack:
    api: Proc
    worker: Proc
    url: str
    env: dict[str, str]
    cert: Path  # where both processes read their client certificate and key
    key: Path


async def wait_for_log(proc: Proc, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in proc.current_run_log():
        assert proc.alive, f"{proc.name} exited:\n{proc.tail()}"
        assert time.monotonic() < deadline, f"{proc.name} never logged {text!r}:\n{proc.tail()}"
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def stack_proxy(temporal_env: WorkflowEnvironment, pki: Pki) -> Iterator[TlsProxy]:
    """An mTLS proxy of the stack's own: the rotation test revokes a certificate on it."""
    proxy = TlsProxy(temporal_address(temporal_env), pki.dir / "server.pem",
                     pki.dir / "server-key.pem", client_ca=pki.ca_file).start()
    yield proxy
    proxy.stop()


@pytest.fixture(scope="module")
def mtls_stack(database_url: str, pki: Pki, stack_proxy: TlsProxy,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[MtlsStack]:
    """An API and a worker, each its own process, reaching Temporal only through the mTLS
    proxy, with the server name to verify given apart from the address."""
    logs = tmp_path_factory.mktemp("mtls-logs")
    live = traversable_dir("uws-mtls-certs-")
    cert, key = pki.client.write(live, "client")
    data_dir = traversable_dir("uws-mtls-data-")
    port = free_port()
    env = uws_env(database_url, data_dir, temporal_address=stack_proxy.address,
                  temporal_tls_server_name="localhost", temporal_tls_ca=pki.ca_file,
                  temporal_tls_cert=cert, temporal_tls_key=key, temporal_reload_seconds="0.5",
                  host="127.0.0.1", port=str(port))
    uws = [sys.executable, "-m", "app.cli"]
    worker = Proc("worker", [*uws, "worker"], logs / "worker.log", env=env)
    api = Proc("api", [*uws, "api"], logs / "api.log", env=env)
    # The two command lines, to rerun by hand (beside the logs; no secret in them).
    settings = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())
                        if k.startswith("UWS_"))
    (logs / "commands.sh").write_text("".join(
        f"{settings} {shlex.join([*uws, command])}\n" for command in ("worker", "api")))
    try:
        worker.start()
        worker.wait_for_log("worker polling task queue")
        api.start()
        api.wait_for_port(port)
        yield MtlsStack(api=api, worker=worker, url=f"http://127.0.0.1:{port}", env=env,
                        cert=cert, key=key)
    finally:
        api.stop()
        worker.stop()
        shutil.rmtree(live, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)


async def run_job(stack: MtlsStack, client_key: str) -> dict:
    """A new user starts a local test job through the API; the job once it has ended."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        name = f"mtls{int(time.time() * 1000) % 10**9}"
        r = await http.post("/tokens/", json={"client_token": client_key, "user_info": {
            "username": name, "email": f"{name}@example.org"}})
        assert r.status_code == 200, r.text
        auth = {"UWS-Authorization": f"Token {r.json()['token']}"}
        r = await http.post("/workspaces/", headers=auth, json={
            "name": "over mTLS", "description": "", "default_job_type": "local_test_job"})
        assert r.status_code == 200, r.text
        workspace = r.json()["data"]["workspace"]["id"]
        r = await http.put(f"/workspaces/{workspace}/start/", headers=auth, json={})
        assert r.status_code == 200, r.text
        job_id = r.json()["data"]["job"]["id"]

        async def ended() -> dict | None:
            got = await http.get(f"/jobs/{job_id}/", headers=auth)
            job = got.json()["data"]["jobs"][0]
            return job if job["status"] in ("complete", "failed") else None

        return await eventually(ended, timeout=90, interval=0.2)


@pytest.fixture(scope="module")
def client_key(mtls_stack: MtlsStack) -> str:
    done = run_uws("create-client-token", "mtls-portal", env=mtls_stack.env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


async def test_api_and_worker_run_a_job_over_mtls(mtls_stack: MtlsStack, client_key: str,
                                                  stack_proxy: TlsProxy, pki: Pki) -> None:
    job = await run_job(mtls_stack, client_key)
    assert job["status"] == "complete", job
    # Both processes said how they connected, and the proxy saw our certificate.
    for proc in (mtls_stack.api, mtls_stack.worker):
        assert "TLS, client certificate CN=uws-worker" in proc.current_run_log()
    assert pki.client.serial in stack_proxy.accepted_serials


async def test_certificate_replaced_on_disk_is_picked_up(mtls_stack: MtlsStack,
                                                         client_key: str, pki: Pki,
                                                         stack_proxy: TlsProxy) -> None:
    old = pki.client
    renewed = pki.ca.issue("uws-worker-renewed")
    renewed.write(mtls_stack.cert.parent, "client")  # same paths, atomically, as cert-manager
    for proc in (mtls_stack.api, mtls_stack.worker):
        await wait_for_log(proc, "Temporal credentials reloaded")
        assert "CN=uws-worker-renewed" in proc.current_run_log()
    assert renewed.serial in stack_proxy.accepted_serials
    # The old certificate is revoked: its connections are cut and no new ones accepted.
    # Only processes that really moved to the new one can run the next job.
    stack_proxy.revoke(old.serial)
    job = await run_job(mtls_stack, client_key)
    assert job["status"] == "complete", job
    assert mtls_stack.api.alive and mtls_stack.worker.alive


# --- start-up failures: each a clear message, never a hang ----------------------------------

def _case_env(case: str, pki: Pki, database_url: str, data_dir: Path,
              proxy: TlsProxy) -> dict[str, str]:
    tls: dict[str, str | Path] = {
        "temporal_address": proxy.address, "temporal_tls_server_name": "localhost",
        "temporal_tls_ca": pki.ca_file, "temporal_tls_cert": pki.client_cert,
        "temporal_tls_key": pki.client_key,
    }
    if case == "wrong CA":
        tls["temporal_tls_ca"] = pki.other_ca_file
    elif case == "client certificate from another CA":
        tls["temporal_tls_cert"] = pki.dir / "foreign-client.pem"
        tls["temporal_tls_key"] = pki.dir / "foreign-client-key.pem"
    elif case == "no client certificate":
        del tls["temporal_tls_cert"], tls["temporal_tls_key"]
    elif case == "expired client certificate":
        tls["temporal_tls_cert"] = pki.dir / "expired-client.pem"
        tls["temporal_tls_key"] = pki.dir / "expired-client-key.pem"
    return uws_env(database_url, data_dir, **tls)


EXPECTED = {
    "wrong CA": "UWS_TEMPORAL_TLS_CA: the certificate of the server at 127.0.0.1:{port} is "
                "not signed by the CA in {pki}/other-ca.pem",
    "client certificate from another CA": "UWS_TEMPORAL_TLS_CERT: the server at "
                                          "127.0.0.1:{port} did not accept the client "
                                          "certificate in {pki}/foreign-client.pem (issued "
                                          "by CN=someone else's CA): it ended the connection "
                                          "after the TLS handshake",
    "no client certificate": "UWS_TEMPORAL_TLS_CERT: the server at 127.0.0.1:{port} closed "
                             "the connection after the TLS handshake: it requires a client "
                             "certificate (set UWS_TEMPORAL_TLS_CERT and UWS_TEMPORAL_TLS_KEY)",
    "expired client certificate": "UWS_TEMPORAL_TLS_CERT: the certificate CN=uws-expired in "
                                  "{pki}/expired-client.pem expired at ",
}


@pytest.mark.parametrize("command", ["worker", "api"])
@pytest.mark.parametrize("case", list(EXPECTED))
def test_bad_credentials_stop_start_up_with_the_reason(case: str, command: str, pki: Pki,
                                                       database_url: str, mtls_proxy: TlsProxy,
                                                       tmp_path: Path) -> None:
    env = _case_env(case, pki, database_url, tmp_path, mtls_proxy)
    env["UWS_PORT"] = str(free_port())
    done = run_uws(command, env=env)  # bounded: a hang is a failure (TimeoutExpired)
    assert done.returncode == 2, done.stderr[-3000:]
    expected = EXPECTED[case].format(port=mtls_proxy.port, pki=pki.dir)
    assert f"configuration error: {expected}" in done.stderr, done.stderr[-3000:]
    assert "Traceback" not in done.stderr


def test_check_temporal_says_how_it_connected(pki: Pki, database_url: str, tmp_path: Path,
                                              mtls_proxy: TlsProxy) -> None:
    env = _case_env("good", pki, database_url, tmp_path, mtls_proxy)
    done = run_uws("check-temporal", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"connected to Temporal at {mtls_proxy.address}, namespace "
                                  "'default': TLS, client certificate CN=uws-worker")
    env["UWS_TEMPORAL_NAMESPACE"] = "no-such-namespace"
    done = run_uws("check-temporal", env=env)
    assert done.returncode == 2
    assert "UWS_TEMPORAL_NAMESPACE: the server has no namespace 'no-such-namespace'" \
        in done.stderr
