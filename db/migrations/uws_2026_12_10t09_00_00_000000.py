from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.columns.base import OnDelete, OnUpdate
from piccolo.columns.column_types import BigInt, BigSerial, ForeignKey, Timestamptz
from piccolo.columns.defaults.timestamptz import TimestamptzNow
from piccolo.columns.indexes import IndexMethod
from piccolo.table import Table

ID = "2026-12-10T09:00:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "disk quota claims of writes in progress; when a disk scan started"


class User(Table, tablename="uws_user", schema=None):
    id = BigSerial(primary_key=True)


class Workspace(Table, tablename="uws_workspace", schema=None):
    id = BigSerial(primary_key=True)


def _params(**extra):
    return {
        "null": False, "primary_key": False, "unique": False, "index": False,
        "index_method": IndexMethod.btree, "choices": None, "db_column_name": None,
        "secret": False, **extra,
    }


def _fk(references):
    return _params(references=references, on_delete=OnDelete.cascade,
                   on_update=OnUpdate.cascade, target_column=None, null=True, index=True)


async def forwards():
    manager = MigrationManager(migration_id=ID, app_name="uws", description=DESCRIPTION)
    table = {"table_class_name": "DiskReservation", "tablename": "uws_disk_reservation",
             "schema": None}
    manager.add_table(class_name="DiskReservation", tablename="uws_disk_reservation",
                      schema=None, columns=None)
    manager.add_column(**table, column_name="id", db_column_name="id",
                       column_class_name="BigSerial", column_class=BigSerial,
                       params=_params(primary_key=True))
    manager.add_column(**table, column_name="user", db_column_name="user",
                       column_class_name="ForeignKey", column_class=ForeignKey,
                       params=_fk(User))
    manager.add_column(**table, column_name="workspace", db_column_name="workspace",
                       column_class_name="ForeignKey", column_class=ForeignKey,
                       params=_fk(Workspace))
    manager.add_column(**table, column_name="bytes", db_column_name="bytes",
                       column_class_name="BigInt", column_class=BigInt,
                       params=_params(default=0))
    manager.add_column(**table, column_name="refreshed", db_column_name="refreshed",
                       column_class_name="Timestamptz", column_class=Timestamptz,
                       params=_params(default=TimestamptzNow()))
    manager.add_column(**table, column_name="finished", db_column_name="finished",
                       column_class_name="Timestamptz", column_class=Timestamptz,
                       params=_params(default=None, null=True))
    manager.add_column(table_class_name="Workspace", tablename="uws_workspace",
                       column_name="disk_scanned", db_column_name="disk_scanned",
                       column_class_name="Timestamptz", column_class=Timestamptz,
                       params=_params(default=None, null=True), schema=None)
    return manager
