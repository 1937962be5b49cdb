"""Retention deletes instance files after delivery, never before."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from storage import outbox
from storage.db import make_engine, make_session_factory, migrate, transaction
from storage.files import InstanceStore
from storage.models import Study, StudyState
from storage.retention import purge_ended
from storage.studies import ReceivedInstance, instance_set, record_instance, settle_due

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _receive(
    sessions: sessionmaker[Session], store: InstanceStore, study: str, sop: str, when: dt.datetime
) -> Path:
    """One instance of ``study`` stored and committed the way the SCP does, at ``when``."""
    relative = f"instances/{study}/1/{sop}.{'0' * 16}.dcm"
    path = store.write_atomically(relative, b"dicom bytes")
    with transaction(sessions) as session:
        record_instance(
            session,
            ReceivedInstance(sop, study, "1", "1.2", "1.2.840.10008.1.2.1", relative, 11, "0" * 64, "CT01"),
            10,
            when,
        )
    return path


def test_files_go_only_after_every_delivery_succeeded_and_the_days_passed(
    database_url: str, tmp_path: Path
) -> None:
    engine = make_engine(database_url)
    migrate(engine)
    sessions = make_session_factory(engine)
    store = InstanceStore(tmp_path / "var")
    store.prepare()
    paths = {}
    for study in ("7.1", "7.2"):
        relative = f"instances/{study}/1/{study}.1.{'0' * 16}.dcm"
        paths[study] = store.write_atomically(relative, b"dicom bytes")
        with transaction(sessions) as session:
            record_instance(
                session,
                ReceivedInstance(
                    f"{study}.1", study, "1", "1.2", "1.2.840.10008.1.2.1", relative, 11, "0" * 64, "CT01"
                ),
                10,
                T0,
            )
            session.execute(
                update(Study).where(Study.study_instance_uid == study).values(state=StudyState.SENDING)
            )
            outbox.enqueue(session, study, 1, f"sr/{study}.dcm", f"{study}.9", ["a", "b"], T0)
    # 7.1: both destinations delivered on day 0. 7.2: one delivered, the other still failing.
    for study, outcomes in (("7.1", ("sent", "sent")), ("7.2", ("sent", "retry"))):
        for destination, outcome in zip(("a", "b"), outcomes, strict=True):
            with transaction(sessions) as session:
                delivery = outbox.claim(session, destination, 60, T0)
                assert delivery is not None and delivery.study_instance_uid == study
                if outcome == "sent":
                    outbox.mark_sent(session, delivery, 0, T0)
                else:
                    outbox.mark_retry(session, delivery, "PACS down", None, T0, delay_seconds=10**6)
    with transaction(sessions) as session:
        assert purge_ended(session, store, 7, T0 + dt.timedelta(days=6)) == []  # too soon
    with transaction(sessions) as session:
        assert purge_ended(session, store, 0, T0 + dt.timedelta(days=60)) == []  # retention off
    with transaction(sessions) as session:
        assert purge_ended(session, store, 7, T0 + dt.timedelta(days=8)) == ["7.1"]
    assert not paths["7.1"].exists() and paths["7.2"].exists()
    with sessions() as session:
        assert session.get_one(Study, "7.1").files_purged_at == T0 + dt.timedelta(days=8)
        assert session.get_one(Study, "7.2").files_purged_at is None
    engine.dispose()


def test_skipped_and_failed_studies_are_purged_too_and_later_instances_wait_for_their_version(
    tmp_path: Path,
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/node.db")
    migrate(engine)
    sessions = make_session_factory(engine)
    store = InstanceStore(tmp_path / "var")
    store.prepare()

    def receive(study: str, sop: str, when: dt.datetime) -> Path:
        return _receive(sessions, store, study, sop, when)

    def end(study: str, state: StudyState) -> None:
        with transaction(sessions) as session:
            session.execute(update(Study).where(Study.study_instance_uid == study).values(state=state))

    skipped, failed = receive("8.1", "8.1.1", T0), receive("8.2", "8.2.1", T0)
    end("8.1", StudyState.SKIPPED)
    end("8.2", StudyState.FAILED)
    day = dt.timedelta(days=1)
    with transaction(sessions) as session:
        assert sorted(purge_ended(session, store, 7, T0 + 8 * day)) == ["8.1", "8.2"]
    assert not skipped.exists() and not failed.exists()
    # A late instance of the purged study: a new version, kept until that version has ended.
    late = receive("8.1", "8.1.2", T0 + 9 * day)
    with transaction(sessions) as session:
        assert purge_ended(session, store, 7, T0 + 30 * day) == []  # receiving again: not ended
        assert settle_due(session, T0 + 9 * day + dt.timedelta(seconds=11)) == ["8.1"]
    with sessions() as session:
        assert instance_set(session, "8.1", 2) == {"8.1.2"}  # the purged file is not analysed
    assert late.exists()
    end("8.1", StudyState.DONE)
    with transaction(sessions) as session:
        assert purge_ended(session, store, 7, T0 + 12 * day) == []  # too soon after the late one
        assert purge_ended(session, store, 7, T0 + 17 * day) == ["8.1"]
        assert purge_ended(session, store, 7, T0 + 30 * day) == []  # nothing left to purge
    assert not late.exists()
    engine.dispose()


def test_an_instance_whose_commit_waited_behind_a_purge_is_not_taken_for_purged(
    database_url: str, tmp_path: Path
) -> None:
    """C-STORE reads the clock, then waits for the lock the purge holds (its files being
    deleted); it commits after the purge with a time before ``files_purged_at``. That instance
    is on disk and must be in the next version's set (and purged later), not counted as gone."""
    engine = make_engine(database_url)
    migrate(engine)
    sessions = make_session_factory(engine)
    store = InstanceStore(tmp_path / "var")
    store.prepare()

    def receive(sop: str, when: dt.datetime) -> Path:
        return _receive(sessions, store, "9.1", sop, when)

    first = receive("9.1.1", T0)
    with transaction(sessions) as session:
        session.execute(update(Study).where(Study.study_instance_uid == "9.1").values(state=StudyState.DONE))
    purge_time = T0 + dt.timedelta(days=8)
    with transaction(sessions) as session:
        assert purge_ended(session, store, 7, purge_time) == ["9.1"]
    assert not first.exists()
    late = receive("9.1.2", purge_time - dt.timedelta(seconds=2))  # clock read before the purge's
    with transaction(sessions) as session:
        assert settle_due(session, purge_time + dt.timedelta(seconds=11)) == ["9.1"]
    with sessions() as session:
        assert instance_set(session, "9.1", 2) == {"9.1.2"}
    assert late.exists()
    engine.dispose()
