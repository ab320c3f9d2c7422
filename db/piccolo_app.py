"""The Piccolo app of uws: its tables and migrations folder."""

import os

from piccolo.conf.apps import AppConfig

from db.tables import ALL_TABLES

APP_CONFIG = AppConfig(
    app_name="uws",
    migrations_folder_path=os.path.join(os.path.dirname(os.path.abspath(__file__)), "migrations"),
    table_classes=list(ALL_TABLES),
    migration_dependencies=[],
    commands=[],
)
