from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.columns.column_types import Integer, Varchar
from piccolo.columns.indexes import IndexMethod

ID = "2026-12-04T03:30:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "the owner of a personal server"


def _params(**extra):
    return {
        "null": False, "primary_key": False, "unique": False, "index": False,
        "index_method": IndexMethod.btree, "choices": None, "db_column_name": None,
        "secret": False, **extra,
    }


async def forwards():
    manager = MigrationManager(migration_id=ID, app_name="uws", description=DESCRIPTION)
    manager.add_table(class_name="PersonalOwner", tablename="uws_personal_owner",
                      schema=None, columns=None)
    manager.add_column(
        table_class_name="PersonalOwner", tablename="uws_personal_owner",
        column_name="id", db_column_name="id", column_class_name="Integer",
        column_class=Integer, params=_params(default=1, primary_key=True), schema=None,
    )
    manager.add_column(
        table_class_name="PersonalOwner", tablename="uws_personal_owner",
        column_name="username", db_column_name="username", column_class_name="Varchar",
        column_class=Varchar, params=_params(length=150, default=""), schema=None,
    )
    return manager
