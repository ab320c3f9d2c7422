"""Engine setup: one asyncpg pool per process, bound to every table.

The DSN is libpq's: ``?sslmode=verify-full&sslrootcert=/ca.pem`` (and ``sslcert``,
``sslkey`` for a client certificate) reach asyncpg as they are. They are checked before the
first connection, and a TLS failure of that connection is told in their terms.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import asyncpg
from piccolo.engine.postgres import PostgresEngine

from core.settings import SettingsError
from db import sql
from db.tables import ALL_TABLES

DSN = "UWS_DATABASE_URL"
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_FILE_PARAMS = ("sslrootcert", "sslcert", "sslkey", "sslcrl")
T = TypeVar("T")


def _params(dsn: str) -> dict[str, str]:
    return {key: values[-1] for key, values in parse_qs(urlsplit(dsn).query).items()}


def check_dsn(dsn: str) -> None:
    """Reject TLS parameters that cannot work, naming them (never the DSN: it may hold a
    password)."""
    query = _params(dsn)
    mode = query.get("sslmode")
    if mode is not None and mode not in SSLMODES:
        raise SettingsError(DSN, f"sslmode={mode} is not one of {', '.join(SSLMODES)}")
    if query.get("sslrootcert") == "system":
        raise SettingsError(DSN, "sslrootcert=system is not supported here: give the path "
                                 "of a CA bundle (e.g. /etc/ssl/certs/ca-certificates.crt)")
    if ("sslcert" in query) != ("sslkey" in query):
        raise SettingsError(DSN, "a client certificate needs both sslcert and sslkey")
    for param in _FILE_PARAMS:
        if param in query:
            path = Path(query[param]).expanduser()
            if not path.is_file():
                raise SettingsError(DSN, f"{param}={path}: no such file")
            if not os.access(path, os.R_OK):
                raise SettingsError(DSN, f"{param}={path}: not readable by this process")


async def _explained(dsn: str, connect: Callable[[], Awaitable[T]]) -> T:
    """``connect()``, its TLS failures turned into what to fix in the DSN."""
    check_dsn(dsn)
    query = _params(dsn)
    mode = query.get("sslmode", "prefer")
    try:
        return await connect()
    except ssl.SSLCertVerificationError as exc:
        ca = query.get("sslrootcert", "~/.postgresql/root.crt")
        raise SettingsError(DSN, f"the database server's certificate failed verification "
                                 f"(sslmode={mode}, sslrootcert={ca}): "
                                 f"{exc.verify_message}") from None
    except ssl.SSLError as exc:
        raise SettingsError(DSN, f"TLS with the database server failed "
                                 f"(sslmode={mode}): {exc.reason or exc}") from None
    except asyncpg.exceptions.ClientConfigurationError as exc:
        raise SettingsError(DSN, str(exc)) from None
    except ConnectionError as exc:
        if "SSL" in str(exc) or "TLS" in str(exc):
            raise SettingsError(DSN, f"the database server does not offer TLS, which "
                                     f"sslmode={mode} requires") from None
        raise


def make_engine(dsn: str) -> PostgresEngine:
    return PostgresEngine(config={"dsn": dsn}, log_queries=False)


def bind_engine(engine: PostgresEngine) -> None:
    for table in ALL_TABLES:
        table._meta.db = engine


async def _keep_session(_: asyncpg.Connection) -> None:
    """Pool reset hook. asyncpg still rolls back an open transaction on release; this
    skips its reset query (a round trip per request), as nothing of ours leaves session
    state behind on pooled connections (LISTEN has a connection of its own)."""


# Engines opened and not yet closed, the newest bound to the tables. Production opens one
# per process; a second one (another app in the same test process) hands the binding back
# to the first when it closes, rather than leaving the tables on a closed pool.
_open: list[PostgresEngine] = []


async def open_engine(dsn: str, *, min_size: int = 2, max_size: int = 20) -> PostgresEngine:
    """Create the engine, bind the tables to it and open its pool."""
    check_dsn(dsn)  # before Piccolo's engine, which connects once to read the version
    engine = make_engine(dsn)
    await _explained(dsn, lambda: engine.start_connection_pool(
        min_size=min_size, max_size=max_size, reset=_keep_session))
    bind_engine(engine)
    sql.attach(engine.pool)
    _open.append(engine)
    return engine


async def close_engine(engine: PostgresEngine) -> None:
    if engine in _open:
        _open.remove(engine)
    if _open:
        bind_engine(_open[-1])
    await sql.detach(engine.pool)
    await engine.close_connection_pool()


async def ensure_database(dsn: str) -> None:
    """Create the DSN's database when it does not exist (first runs and tests)."""
    parts = urlsplit(dsn)
    name = unquote(parts.path.lstrip("/")) or "postgres"
    admin_dsn = urlunsplit(parts._replace(path="/postgres"))
    conn = await _explained(dsn, lambda: asyncpg.connect(admin_dsn))
    try:
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
            quoted = '"' + name.replace('"', '""') + '"'
            try:
                await conn.execute(f"CREATE DATABASE {quoted}")
            except asyncpg.DuplicateDatabaseError:
                pass  # another process created it meanwhile
    finally:
        await conn.close()


async def migrate(dsn: str) -> None:
    """Apply every pending migration (idempotent)."""
    check_dsn(dsn)
    os.environ["UWS_DATABASE_URL"] = dsn
    os.environ.setdefault("PICCOLO_CONF", "db.piccolo_conf")
    from piccolo.apps.migrations.commands.forwards import run_forwards
    from piccolo.apps.migrations.tables import Migration

    import db.piccolo_conf as conf

    conf.DB = make_engine(dsn)
    # Piccolo's own table keeps the engine it first found: a second database migrated in
    # the same process must not be recorded in the first one.
    Migration._meta.db = conf.DB
    result = await run_forwards(app_name="uws", migration_id="all", fake=False)
    if not result.success:
        raise RuntimeError(f"migration failed: {result.message}")
