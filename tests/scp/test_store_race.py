"""Two identical instances racing (a modality resending after a DIMSE timeout) share one
content-hashed file. The one whose commit fails must not remove the file the other's
acknowledged row points to."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

from pydicom import dcmread
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from conf import NodeSettings, Settings, StorageSettings
from scp.server import StorageSCP
from storage.db import open_database
from storage.files import InstanceStore
from storage.models import Instance, Study
from tests.data.generate import write_series
from tests.data.ingest import ingest
from tests.nodes import free_port


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


def test_a_receiver_starting_beside_others_leaves_their_files_in_flight(tmp_path: Path) -> None:
    """Receivers share storage.root/tmp: one that starts while another receives must not purge
    the other's file (the main process purged it once, before forking them)."""
    root = tmp_path / "var"
    url = f"sqlite:///{root}/ainode.db"
    in_flight = root / "tmp" / "tmp-another-receiver.dcm"
    in_flight.parent.mkdir(parents=True)
    in_flight.write_bytes(b"half received")
    settings = Settings(
        node=NodeSettings(host="127.0.0.1", port=free_port()),
        storage=StorageSettings(root=root, database_url=url),
    )
    with open_database(url) as sessions:
        beside = StorageSCP(settings, sessions, settles=False, reuse_port=True)
        beside.start()
        beside.stop(grace_seconds=1)
        assert in_flight.read_bytes() == b"half received"
        alone = StorageSCP(settings, sessions)  # the only receiver: leftovers of a crash go
        alone.start()
        alone.stop(grace_seconds=1)
    assert not in_flight.exists()


def test_only_the_main_process_restarts_the_settle_window_of_receiving_studies(tmp_path: Path) -> None:
    root = tmp_path / "var"
    store = InstanceStore(root)
    store.prepare()
    url = f"sqlite:///{root}/ainode.db"
    study = ingest(write_series(tmp_path / "ct", 1), store, url)  # receiving
    settings = Settings(
        node=NodeSettings(host="127.0.0.1", port=free_port()),
        storage=StorageSettings(root=root, database_url=url),
    )
    with open_database(url) as sessions:

        def settle_at() -> object:
            with sessions() as session:
                return session.get_one(Study, study).settle_at

        before = settle_at()
        receiver = StorageSCP(settings, sessions, settles=False, reuse_port=True)
        receiver.start()
        receiver.stop(grace_seconds=1)
        assert settle_at() == before
        main = StorageSCP(settings, sessions, reuse_port=True)
        main.start()
        main.stop(grace_seconds=1)
        assert settle_at() > before  # type: ignore[operator]


def test_a_store_that_ends_after_its_association_closed_leaves_nothing_open(tmp_path: Path) -> None:
    """pynetdicom reports a dropped connection from its network thread while the association's
    thread may still be storing. That store must not open the association again: the
    housekeeper would push its study's settle time for as long as the node runs."""
    root = tmp_path / "var"
    url = f"sqlite:///{root}/ainode.db"
    settings = Settings(storage=StorageSettings(root=root, database_url=url, min_free_mb=1))
    (source,) = write_series(tmp_path / "ct", 1)
    closed = SimpleNamespace(requestor=SimpleNamespace(ae_title="CT01"))  # no longer open
    with open_database(url) as sessions:
        scp = StorageSCP(settings, sessions)
        scp.store.prepare()
        received = scp.store.tmp_dir / "received.dcm"
        shutil.copy(source, received)
        ds = dcmread(source, stop_before_pixels=True)
        status, _ = scp.store_received(closed, str(ds.SOPClassUID), str(ds.SOPInstanceUID), received)  # type: ignore[arg-type]
        assert status == 0x0000
        assert scp._open == {}
        with sessions() as session:
            assert session.get_one(Study, str(ds.StudyInstanceUID)).instance_count == 1
