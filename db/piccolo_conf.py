"""Piccolo's configuration module (``PICCOLO_CONF=db.piccolo_conf``).

The engine reads ``UWS_DATABASE_URL`` (or the file ``UWS_DATABASE_URL_FILE`` names) when
it is imported. The ``uws`` commands make sure the variable is set (starting the embedded
PostgreSQL when it is not) before the tables are first used; ``db.engine.bind_engine``
rebinds tables for tests. libpq's TLS parameters in the DSN (``sslmode=verify-full``,
``sslrootcert``, ``sslcert``, ``sslkey``) are passed to asyncpg as they are.
"""

from piccolo.conf.apps import AppRegistry
from piccolo.engine.postgres import PostgresEngine

from core.settings import secret_from_env

DB = PostgresEngine(config={"dsn": secret_from_env("UWS_DATABASE_URL") or "postgresql:///uws"})

APP_REGISTRY = AppRegistry(apps=["db.piccolo_app"])
