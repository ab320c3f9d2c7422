"""Piccolo's configuration module (``PICCOLO_CONF=db.piccolo_conf``).

The engine reads ``UWS_DATABASE_URL`` when it is imported. The ``uws`` commands make
sure the variable is set (starting the embedded PostgreSQL when it is not) before the
tables are first used; ``db.engine.bind_engine`` rebinds tables for tests.
"""

import os

from piccolo.conf.apps import AppRegistry
from piccolo.engine.postgres import PostgresEngine

DB = PostgresEngine(config={"dsn": os.environ.get("UWS_DATABASE_URL", "postgresql:///uws")})

APP_REGISTRY = AppRegistry(apps=["db.piccolo_app"])
