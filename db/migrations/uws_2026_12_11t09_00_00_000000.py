from piccolo.apps.migrations.auto.migration_manager import MigrationManager
from piccolo.engine.finder import engine_finder

ID = "2026-12-11T09:00:00:000000"
VERSION = "1.38.0"
DESCRIPTION = "external identities (issuer, subject) bound to one user per sign-in method"

# The identity lives in external_user_details under "identity" ({"issuer", "subject"}):
# one account per identity and sign-in method; issuer and subject lead, so the lookup by
# identity alone (db.accounts) uses the index too.
_INDEX = (
    "CREATE UNIQUE INDEX IF NOT EXISTS uws_external_user_mapping_identity "
    "ON uws_external_user_mapping ((external_user_details->'identity'->>'issuer'), "
    "(external_user_details->'identity'->>'subject'), user_authentication_name) "
    "WHERE (external_user_details->'identity') IS NOT NULL"
)


async def _create_index() -> None:
    engine = engine_finder()
    assert engine is not None
    await engine.run_ddl(_INDEX)


async def _drop_index() -> None:
    engine = engine_finder()
    assert engine is not None
    await engine.run_ddl("DROP INDEX IF EXISTS uws_external_user_mapping_identity")


async def forwards():
    manager = MigrationManager(migration_id=ID, app_name="uws", description=DESCRIPTION)
    manager.add_raw(_create_index)
    manager.add_raw_backwards(_drop_index)
    return manager
