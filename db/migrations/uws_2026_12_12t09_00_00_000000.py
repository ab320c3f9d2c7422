from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.columns.base import OnDelete, OnUpdate
from piccolo.columns.column_types import BigSerial, ForeignKey, Timestamptz, Varchar
from piccolo.columns.indexes import IndexMethod
from piccolo.table import Table

ID = "2026-12-12T09:00:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "the web page's login tickets and sessions (hashed keys)"


class User(Table, tablename="uws_user", schema=None):
    id = BigSerial(primary_key=True)


def _params(**extra):
    return {
        "null": False, "primary_key": False, "unique": False, "index": False,
        "index_method": IndexMethod.btree, "choices": None, "db_column_name": None,
        "secret": False, **extra,
    }


async def forwards():
    manager = MigrationManager(migration_id=ID, app_name="uws", description=DESCRIPTION)
    table = {"table_class_name": "BrowserCredential", "tablename": "uws_browser_credential",
             "schema": None}
    manager.add_table(class_name="BrowserCredential", tablename="uws_browser_credential",
                      schema=None, columns=None)
    manager.add_column(**table, column_name="id", db_column_name="id",
                       column_class_name="BigSerial", column_class=BigSerial,
                       params=_params(primary_key=True))
    manager.add_column(**table, column_name="kind", db_column_name="kind",
                       column_class_name="Varchar", column_class=Varchar,
                       params=_params(length=8, default=""))
    manager.add_column(**table, column_name="key_hash", db_column_name="key_hash",
                       column_class_name="Varchar", column_class=Varchar,
                       params=_params(length=64, default="", unique=True))
    manager.add_column(**table, column_name="user", db_column_name="user",
                       column_class_name="ForeignKey", column_class=ForeignKey,
                       params=_params(references=User, on_delete=OnDelete.cascade,
                                      on_update=OnUpdate.cascade, target_column=None,
                                      null=True, index=True))
    manager.add_column(**table, column_name="expires", db_column_name="expires",
                       column_class_name="Timestamptz", column_class=Timestamptz,
                       params=_params(default=None, index=True))
    return manager
