"""An in-process storage SCP on a fresh loopback port, for the tests of scp/."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conf import NodeSettings, Settings, StorageSettings, StudySettings
from scp.server import StorageSCP
from storage.db import open_database
from tests.nodes import free_port


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    root = tmp_path / "var"
    settings = Settings(
        node=NodeSettings(host="127.0.0.1", port=free_port(), network_timeout_seconds=5),
        storage=StorageSettings(root=root, database_url=f"sqlite:///{root}/ainode.db", min_free_mb=1),
        study=StudySettings(settle_seconds=30),
    )
    with open_database(settings.storage.database_url) as sessions:
        node = StorageSCP(settings, sessions)
        node.start()
        try:
            yield node
        finally:
            node.stop(grace_seconds=2)
