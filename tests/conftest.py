"""Shared fixtures: nodes in subprocesses, database URLs for SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.nodes import Node, NodeFactory

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[NodeFactory]:
    nodes: list[Node] = []

    def factory(**sections: Any) -> Node:
        workdir = tmp_path / f"node{len(nodes)}"
        workdir.mkdir()
        node = Node(workdir, **sections)
        nodes.append(node)
        return node

    yield factory
    for node in nodes:
        node.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    name = f"ainode_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # pragma: no cover - the machine promises PostgreSQL
        admin.dispose()
        pytest.fail(f"PostgreSQL at 127.0.0.1:5432 is not usable: {exc}")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        try:
            with admin.connect() as conn:
                # FORCE ends the sessions and drops in one step: a node still running (a fixture
                # torn down after this one stops it) can reconnect between a separate
                # pg_terminate_backend and the DROP ("being accessed by other users").
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/queue.db"
    url: str = request.getfixturevalue("postgres_url")
    return url
