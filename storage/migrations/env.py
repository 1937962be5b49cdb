"""Alembic environment: runs on the engine the node created (``config.attributes['engine']``).

The whole upgrade is one transaction that starts by taking the database's write lock, so a node's
``serve`` and ``worker`` (or several workers) starting together on a fresh database migrate it once:
the second waits, then finds it current. Alembic commits SQLite migrations one by one unless told
SQLite's DDL is transactional (it is); PostgreSQL takes an advisory lock for the same effect.
"""

from alembic import context
from sqlalchemy import Engine, text

from storage.models import Base

MIGRATION_LOCK_KEY = 0x61696E6F6465  # "ainode": one advisory lock for every node sharing the database

engine = context.config.attributes.get("engine")
if not isinstance(engine, Engine):
    raise RuntimeError("storage.migrations must be run through storage.db.migrate(engine)")

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        transactional_ddl=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()
    connection.commit()
