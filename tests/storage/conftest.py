"""Fixtures of the storage tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from storage.db import make_engine, make_session_factory, migrate


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A migrated database (SQLite and PostgreSQL, from ``database_url``) for one test."""
    engine = make_engine(database_url)
    migrate(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def counted(sessions: sessionmaker[Session]) -> Iterator[list[str]]:
    """Every SELECT the test's database runs, in order (to count a page's queries)."""
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append(statement)

    engine = sessions.kw["bind"]
    event.listen(engine, "before_cursor_execute", count)
    yield statements
    event.remove(engine, "before_cursor_execute", count)
