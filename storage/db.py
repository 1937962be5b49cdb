"""Database engine and sessions, created once at start and passed in.

SQLite (the default) runs in WAL mode with ``synchronous=FULL`` so a committed instance survives a
power cut, and a busy timeout so concurrent associations wait instead of failing. A
:func:`transaction` (every write) starts with ``BEGIN IMMEDIATE``: taking the write lock up front
avoids the deadlock where two readers both try to upgrade to writers (SQLITE_BUSY that no busy
timeout can resolve). A plain session (``sessions()``, reads only: status, metrics, preparing a
study's pixels) starts with a deferred ``BEGIN`` and never takes the write lock, so a long read
never holds up a C-STORE commit (WAL readers and the one writer do not block each other).
PostgreSQL needs none of that.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, InterfaceError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from storage.errors import DatabaseNotUsable, DatabaseUnavailable

SQLITE_BUSY_TIMEOUT_SECONDS = 30.0
MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def make_engine(database_url: str) -> Engine:
    """Create the engine for ``storage.database_url`` (SQLite file or PostgreSQL)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            # isolation_level=None hands transaction control to us (the "begin" hook below);
            # pysqlite's own implicit BEGIN is deferred and cannot be made IMMEDIATE.
            connect_args={
                "isolation_level": None,
                "timeout": SQLITE_BUSY_TIMEOUT_SECONDS,
                "check_same_thread": False,
            },
            pool_size=8,
            max_overflow=64,
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    return create_engine(url, pool_size=8, max_overflow=64, pool_pre_ping=True)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_SECONDS * 1000)}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


_WRITING: contextvars.ContextVar[bool] = contextvars.ContextVar("ainode_db_writing", default=False)


def _sqlite_on_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE" if _WRITING.get() else "BEGIN")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _safe(database_url: str) -> str:
    try:
        return make_url(database_url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparseable)"


@contextmanager
def open_database(database_url: str) -> Iterator[sessionmaker[Session]]:
    """Engine, migrations, sessions for one command's lifetime; the engine is disposed after.
    :class:`DatabaseNotUsable` names the fix when the URL, its driver or the server is wrong."""
    where = f"storage.database_url {_safe(database_url)}"
    try:
        engine = make_engine(database_url)
    except ArgumentError:
        raise DatabaseNotUsable(
            f"{where} is not a database URL (sqlite:///path/ainode.db or postgresql+psycopg://user@host/db)"
        ) from None
    except (NoSuchModuleError, ModuleNotFoundError) as exc:
        fix = 'pip install "ainode[postgres]"' if "postgres" in database_url else "install its driver"
        raise DatabaseNotUsable(f"{where}: its database driver is not installed ({exc}); {fix}") from None
    try:
        try:
            migrate(engine)
        except (OperationalError, InterfaceError) as exc:
            reason = " ".join(str(exc.orig).split())[:200]
            raise DatabaseNotUsable(f"{where} cannot be opened: {reason}") from None
        yield make_session_factory(engine)
    finally:
        engine.dispose()


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One committed transaction; database connection failures become
    :class:`DatabaseUnavailable` so callers can answer 0xA700 instead of crashing."""
    writing = _WRITING.set(True)
    try:
        with factory.begin() as session:
            yield session
    except DBAPIError as exc:
        if exc.connection_invalidated or _is_operational(exc):
            raise DatabaseUnavailable(f"database unavailable: {type(exc.orig).__name__}") from exc
        raise
    finally:
        _WRITING.reset(writing)


def _is_operational(exc: DBAPIError) -> bool:
    return isinstance(exc, OperationalError)


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration (run at every start; a no-op when current),
    holding the write lock from its first read, as every write does.

    Processes starting together on one SQLite file can still meet "database is locked" where
    SQLite's busy timeout does not apply (a connection opening while the last one closes and
    clears the WAL, or while a WAL is recovered); the whole upgrade is one transaction, so it is
    tried again while the busy timeout has not passed since the first try (a try may itself wait
    that long: at most about twice the timeout in all)."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_SECONDS
    writing = _WRITING.set(True)
    try:
        while True:
            try:
                command.upgrade(alembic_config(engine), "head")
                return
            except OperationalError as exc:
                locked = engine.dialect.name == "sqlite" and "locked" in str(exc.orig)
                if not locked or time.monotonic() > deadline:
                    raise
                engine.dispose()
                time.sleep(0.05)
    finally:
        _WRITING.reset(writing)
