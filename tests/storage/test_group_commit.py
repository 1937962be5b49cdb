"""Group commit on SQLite and PostgreSQL: instances handed in by many threads at once share
transactions, each thread gets its own instance's result, and one bad instance fails only itself."""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from storage import group_commit
from storage.errors import StorageUnavailable
from storage.group_commit import GroupCommitter
from storage.models import Instance, Study, utc_now
from storage.studies import HeaderIndex, IngestOutcome, IngestResult
from tests.storage.test_queue import instance

THREADS = 24


def at_once(calls: list[Callable[[], object]]) -> list[object]:
    """Each call in its own thread, all released together; each one's result or error."""
    outcomes: list[object] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def one(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = calls[index]()
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


def record_at_once(committer: GroupCommitter, items: list[object], folder: Path | None) -> list[object]:
    """Each item recorded from its own thread, all released together; the result or the error."""
    return at_once([functools.partial(committer.record, item, folder) for item in items])  # type: ignore[arg-type]


def test_concurrent_instances_share_commits_and_each_gets_its_own_result(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    committer = GroupCommitter(sessions, 10.0, utc_now)
    items = [instance(f"1.{i}", sha=f"{i:064x}") for i in range(THREADS)]
    # The same SOP Instance UID and bytes twice in one batch (a modality resending after a
    # DIMSE timeout): one is stored, the other is a duplicate, neither fails.
    items.append(instance("1.0", sha=f"{0:064x}"))
    outcomes = record_at_once(committer, list(items), tmp_path)
    assert all(isinstance(o, IngestResult) for o in outcomes), outcomes
    results = [o.outcome for o in outcomes if isinstance(o, IngestResult)]
    assert results.count(IngestOutcome.STORED) == THREADS
    assert results.count(IngestOutcome.DUPLICATE) == 1
    assert committer.stats.instances == THREADS + 1
    # Threads released together cannot all have led a batch of one.
    assert committer.stats.batches < THREADS + 1 and committer.stats.largest > 1
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == THREADS
        assert session.get_one(Study, "1.2.3").instance_count == THREADS


def test_one_instance_the_database_refuses_fails_only_itself(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    committer = GroupCommitter(sessions, 10.0, utc_now)
    good = [instance(f"2.{i}", sha=f"{i:064x}") for i in range(8)]
    # NOT NULL: an IntegrityError for the whole batch it lands in
    bad = dataclasses.replace(instance("2.99", sha="f" * 64), sop_class_uid=None)  # type: ignore[arg-type]
    outcomes = record_at_once(committer, [*good, bad], tmp_path)
    assert all(isinstance(o, IngestResult) and o.outcome is IngestOutcome.STORED for o in outcomes[:-1])
    assert isinstance(outcomes[-1], Exception) and "sop_class_uid" in str(outcomes[-1]).lower()
    with sessions() as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid)))
    assert stored == {item.sop_instance_uid for item in good}


def test_an_unusable_database_or_folder_fails_the_batch_with_storage_unavailable(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    engine = create_engine(f"sqlite:///{tmp_path}/not-a-folder/db.sqlite")
    try:
        committer = GroupCommitter(sessionmaker(engine), 10.0, utc_now)
        outcomes = record_at_once(committer, [instance(f"3.{i}") for i in range(4)], None)
        assert outcomes and all(isinstance(o, Exception) for o in outcomes), outcomes
    finally:
        engine.dispose()
    with pytest.raises(StorageUnavailable, match="cannot sync"):
        GroupCommitter(sessionmaker(), 10.0, utc_now).record(instance("4.1"), tmp_path / "gone")


def test_one_instance_the_database_cannot_take_fails_only_itself(
    sessions: sessionmaker[Session], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a unique key but a value: a hostile header's NUL inside a string is a DataError on
    # PostgreSQL (text cannot hold NUL), stored as is on SQLite. Either way the instances of the
    # other associations in its batch are stored and acknowledged.
    committer = GroupCommitter(sessions, 10.0, utc_now)
    good = [instance(f"5.{i}", sha=f"{i:064x}") for i in range(8)]
    hostile = dataclasses.replace(instance("5.99", sha="e" * 64), header=HeaderIndex(modality="C\x00T"))
    batch: list[object] = [*good, hostile]
    # A first instance's leader waits in its folder sync until all of ``batch`` is waiting: they
    # then form the next batch together, the hostile instance with the good ones.
    syncing = threading.Event()

    def slow_first_sync(folder: Path) -> None:
        if not syncing.is_set():
            syncing.set()
            deadline = time.monotonic() + 10
            while len(committer._pending) < len(batch) and time.monotonic() < deadline:
                time.sleep(0.01)

    monkeypatch.setattr(group_commit, "fsync_path", slow_first_sync)
    first = threading.Thread(target=committer.record, args=(instance("5.0.0", sha="d" * 64), tmp_path))
    first.start()
    assert syncing.wait(10)
    outcomes = record_at_once(committer, list(batch), tmp_path)
    first.join(timeout=10)
    assert committer.stats.largest == len(batch) or committer.stats.batches == 1
    stored_ok = [isinstance(o, IngestResult) and o.outcome is IngestOutcome.STORED for o in outcomes]
    assert stored_ok[:-1] == [True] * len(good), outcomes
    with sessions() as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid)))
    assert stored >= {"5.0.0", *(item.sop_instance_uid for item in good)}


def test_a_row_waits_for_its_file_s_fsync_and_a_failed_fsync_fails_only_its_instance(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """The bytes' fsync overlaps the folder's; the row is written only once it succeeded."""
    committer = GroupCommitter(sessions, 10.0, utc_now)
    synced: Future[None] = Future()
    failed: Future[None] = Future()
    outcomes: dict[str, object] = {}

    def one(name: str, durable: Future[None]) -> None:
        try:
            outcomes[name] = committer.record(instance(f"1.9.{len(name)}", sha=name * 64), tmp_path, durable)
        except Exception as exc:
            outcomes[name] = exc

    threads = [
        threading.Thread(target=one, args=("a", synced)),
        threading.Thread(target=one, args=("bb", failed)),
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    with sessions() as session:  # still waiting for the bytes: no row yet
        assert session.scalar(select(func.count(Instance.id))) == 0
    synced.set_result(None)
    failed.set_exception(OSError(5, "Input/output error"))
    for thread in threads:
        thread.join(timeout=30)
    assert isinstance(outcomes["a"], IngestResult) and outcomes["a"].outcome is IngestOutcome.STORED
    assert isinstance(outcomes["bb"], StorageUnavailable)
    assert "Input/output error" in str(outcomes["bb"])
    with sessions() as session:
        assert session.scalars(select(Instance.sop_instance_uid)).all() == ["1.9.1"]
