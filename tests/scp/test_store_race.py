"""Two identical instances racing (a modality resending after a DIMSE timeout) share one
content-hashed file. The one whose commit fails must not remove the file the other's
acknowledged row points to."""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from conf import Settings, StorageSettings
from scp.server import StorageSCP
from storage.db import open_database
from storage.files import InstanceStore
from storage.models import Instance
from tests.data.generate import write_series
from tests.data.ingest import ingest


def test_a_failed_commit_keeps_a_file_that_an_acknowledged_row_names(tmp_path: Path) -> None:
    root = tmp_path / "var"
    store = InstanceStore(root)
    store.prepare()
    url = f"sqlite:///{root}/ainode.db"
    (first,) = write_series(tmp_path / "ct", 1)
    ingest([first], store, url)  # the other association: stored, committed, acknowledged
    settings = Settings(storage=StorageSettings(root=root, database_url=url))
    sop = str(dcmread(first, stop_before_pixels=True).SOPInstanceUID)
    with open_database(url) as sessions:
        scp = StorageSCP(settings, sessions)
        with sessions() as session:
            acknowledged = session.query(Instance.path).filter(Instance.sop_instance_uid == sop).scalar()
        assert acknowledged is not None
        assert not scp.remove_if_unreferenced(sop, acknowledged)
        assert (root / acknowledged).is_file()
        # A file no row names (this association's own, its commit failed): removed.
        orphan = acknowledged.replace(".dcm", ".orphan.dcm")
        shutil.copy(root / acknowledged, root / orphan)
        assert scp.remove_if_unreferenced(sop, orphan)
        assert not (root / orphan).exists()
    # The database cannot answer: nothing is removed, whatever the file.
    (tmp_path / "not-a-folder").write_text("")
    unreachable = create_engine(f"sqlite:///{tmp_path}/not-a-folder/db.sqlite")
    try:
        blind = StorageSCP(settings, sessionmaker(unreachable))
        shutil.copy(root / acknowledged, root / orphan)
        assert not blind.remove_if_unreferenced(sop, orphan)
        assert (root / orphan).is_file()
    finally:
        unreachable.dispose()
