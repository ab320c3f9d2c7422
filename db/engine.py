"""Engine setup: one asyncpg pool per process, bound to every table."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit, urlunsplit

import asyncpg
from piccolo.engine.postgres import PostgresEngine

from db import reads
from db.tables import ALL_TABLES


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
    engine = make_engine(dsn)
    await engine.start_connection_pool(min_size=min_size, max_size=max_size,
                                       reset=_keep_session)
    bind_engine(engine)
    reads.attach(engine.pool)
    _open.append(engine)
    return engine


async def close_engine(engine: PostgresEngine) -> None:
    if engine in _open:
        _open.remove(engine)
    if _open:
        bind_engine(_open[-1])
    await reads.detach(engine.pool)
    await engine.close_connection_pool()


async def ensure_database(dsn: str) -> None:
    """Create the DSN's database when it does not exist (first runs and tests)."""
    parts = urlsplit(dsn)
    name = unquote(parts.path.lstrip("/")) or "postgres"
    admin_dsn = urlunsplit(parts._replace(path="/postgres"))
    conn = await asyncpg.connect(admin_dsn)
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
    os.environ["UWS_DATABASE_URL"] = dsn
    os.environ.setdefault("PICCOLO_CONF", "db.piccolo_conf")
    from piccolo.apps.migrations.commands.forwards import run_forwards

    import db.piccolo_conf as conf

    conf.DB = make_engine(dsn)
    result = await run_forwards(app_name="uws", migration_id="all", fake=False)
    if not result.success:
        raise RuntimeError(f"migration failed: {result.message}")
