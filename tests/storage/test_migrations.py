"""The migrations produce exactly the models, on SQLite and on PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, inspect, text

from storage.db import alembic_config, make_engine, migrate
from storage.models import Base
from tests.nodes import stop_process


def test_migrations_match_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        migrate(engine)
        migrate(engine)  # a second start is a no-op
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            tables = set(inspect(conn).get_table_names())
        assert diff == []
        assert {"studies", "instances", "jobs", "alembic_version"} <= tables
    finally:
        engine.dispose()


_MIGRATE_AT_THE_SIGNAL = """
import sys, time
from pathlib import Path
from storage.db import make_engine, migrate
go = Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
engine = make_engine(sys.argv[1])
migrate(engine)
engine.dispose()
"""


def test_processes_starting_together_on_a_fresh_database_migrate_it_once(
    database_url: str, tmp_path: Path
) -> None:
    """`ainode serve` and `ainode worker` started together (compose, systemd) used to race: one
    failed with "duplicate column name" or "database is locked" and exited 2."""
    go = tmp_path / "go"
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", _MIGRATE_AT_THE_SIGNAL, database_url, str(go)], stderr=subprocess.PIPE
        )
        for _ in range(4)
    ]
    try:
        time.sleep(1.0)  # every interpreter imported and polling
        go.touch()
        errors = [proc.communicate(timeout=120)[1].decode() for proc in starters]
    finally:
        for proc in starters:
            stop_process(proc)
    assert [proc.returncode for proc in starters] == [0, 0, 0, 0], "\n".join(errors)
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert len(versions) == 1 and diff == []
    finally:
        engine.dispose()


def test_a_fresh_sqlite_database_is_migrated_in_one_write_transaction(tmp_path: Path) -> None:
    """Alembic commits each SQLite migration on its own unless told SQLite's DDL is
    transactional: a second process could then find the schema half made."""
    engine = make_engine(f"sqlite:///{tmp_path}/fresh.db")
    begins: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("BEGIN"):
            begins.append(statement.strip())

    event.listen(engine, "before_cursor_execute", seen)
    try:
        migrate(engine)
        event.remove(engine, "before_cursor_execute", seen)
        with engine.connect() as conn:
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
    finally:
        engine.dispose()
    assert begins == ["BEGIN IMMEDIATE"]
    assert version == ScriptDirectory.from_config(alembic_config(engine)).get_current_head()
