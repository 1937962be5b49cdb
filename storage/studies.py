"""Recording received instances and settling studies.

A study is ready for analysis when nothing of it has arrived for ``study.settle_seconds`` and no
association is still sending it (the SCP keeps pushing ``settle_at`` while one is open). It then
gets exactly one analysis job per version: the job table's unique key (kind, study, version)
makes a second settle of the same version a no-op. Instances that arrive after analysis began
bump the version, so the late images are analysed again and the SR is versioned.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import Instance, Job, JobKind, JobState, Study, StudyState


class IngestOutcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing changes
    REPLACED = "replaced"  # same SOP Instance UID, new bytes: the study reopens


@dataclass(frozen=True)
class ReceivedInstance:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: str
    size: int
    sha256: str
    calling_ae_title: str


@dataclass(frozen=True)
class IngestResult:
    outcome: IngestOutcome
    superseded_path: str | None = None  # the old file to delete once the commit is done


def _insert(session: Session):  # type: ignore[no-untyped-def]
    """The dialect's INSERT, which offers ON CONFLICT."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalars(
        select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
    ).one_or_none()


def record_instance(
    session: Session, received: ReceivedInstance, settle_seconds: float, now: dt.datetime
) -> IngestResult:
    """Record one durable instance file and update its study, in the caller's transaction."""
    existing = session.scalars(
        select(Instance).where(Instance.sop_instance_uid == received.sop_instance_uid).with_for_update()
    ).one_or_none()
    if existing is not None and existing.sha256 == received.sha256:
        return IngestResult(IngestOutcome.DUPLICATE)

    study = _lock_study(session, received, now)
    settle_at = now + dt.timedelta(seconds=settle_seconds)
    superseded: str | None = None
    if existing is None:
        series_is_new = (
            session.scalar(
                select(Instance.id)
                .where(Instance.study_instance_uid == received.study_instance_uid)
                .where(Instance.series_instance_uid == received.series_instance_uid)
                .limit(1)
            )
            is None
        )
        session.add(Instance(**_columns(received), received_at=now))
        study.instance_count += 1
        study.series_count += int(series_is_new)
        outcome = IngestOutcome.STORED
    else:
        superseded = existing.path if existing.path != received.path else None
        previous_study = existing.study_instance_uid
        for name, value in _columns(received).items():
            setattr(existing, name, value)
        existing.received_at = now
        session.flush()
        for uid in {previous_study, received.study_instance_uid}:
            _recount(session, uid)
        outcome = IngestOutcome.REPLACED

    study.last_received_at = now
    study.calling_ae_title = received.calling_ae_title
    _reopen(session, study, settle_at)
    return IngestResult(outcome, superseded)


def _columns(received: ReceivedInstance) -> dict[str, object]:
    return {
        "sop_instance_uid": received.sop_instance_uid,
        "study_instance_uid": received.study_instance_uid,
        "series_instance_uid": received.series_instance_uid,
        "sop_class_uid": received.sop_class_uid,
        "transfer_syntax_uid": received.transfer_syntax_uid,
        "path": received.path,
        "size": received.size,
        "sha256": received.sha256,
        "calling_ae_title": received.calling_ae_title,
    }


def _lock_study(session: Session, received: ReceivedInstance, now: dt.datetime) -> Study:
    # INSERT ... ON CONFLICT DO NOTHING then SELECT ... FOR UPDATE: two associations sending the
    # same new study at once both end up holding the one row, one after the other.
    session.execute(
        _insert(session)(Study)
        .values(
            study_instance_uid=received.study_instance_uid,
            state=StudyState.RECEIVING,
            version=1,
            instance_count=0,
            series_count=0,
            first_received_at=now,
            last_received_at=now,
            settle_at=now,
            calling_ae_title=received.calling_ae_title,
        )
        .on_conflict_do_nothing()
    )
    return session.scalars(
        select(Study)
        .where(Study.study_instance_uid == received.study_instance_uid)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).one()


def _recount(session: Session, study_instance_uid: str) -> None:
    instances, series = session.execute(
        select(func.count(Instance.id), func.count(func.distinct(Instance.series_instance_uid))).where(
            Instance.study_instance_uid == study_instance_uid
        )
    ).one()
    session.execute(
        update(Study)
        .where(Study.study_instance_uid == study_instance_uid)
        .values(instance_count=instances, series_count=series)
    )


def _reopen(session: Session, study: Study, settle_at: dt.datetime) -> None:
    """New data for a study: receiving again, settle later, and a new version if analysis of
    the current one has begun (its job is no longer waiting in the queue)."""
    if study.state == StudyState.QUEUED:
        # Still unclaimed: keep its job, just push it back (debounce, not a second job).
        session.execute(
            update(Job)
            .where(Job.study_instance_uid == study.study_instance_uid)
            .where(Job.study_version == study.version)
            .where(Job.state == JobState.QUEUED)
            .values(run_after=settle_at)
        )
    elif study.state != StudyState.RECEIVING:
        study.version += 1
    study.state = StudyState.RECEIVING
    study.settle_at = max(study.settle_at, settle_at)
    study.last_error = None


def extend_settle(session: Session, study_instance_uids: Iterable[str], until: dt.datetime) -> int:
    """Keep studies that an open association is still sending from settling."""
    uids = sorted(set(study_instance_uids))
    if not uids:
        return 0
    result = session.execute(
        update(Study)
        .where(Study.study_instance_uid.in_(uids))
        .where(Study.state == StudyState.RECEIVING)
        .where(Study.settle_at < until)
        .values(settle_at=until)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def settle_due(session: Session, now: dt.datetime, priority: int = 0) -> list[str]:
    """Queue every receiving study whose settle time has passed; return their UIDs.

    Safe to run from several processes at once: rows are locked (SKIP LOCKED on PostgreSQL,
    the write lock on SQLite), and the job's unique key turns a repeat into a no-op.
    """
    due = session.execute(
        select(Study.study_instance_uid, Study.version)
        .where(Study.state == StudyState.RECEIVING)
        .where(Study.settle_at <= now)
        .order_by(Study.settle_at)
        .with_for_update(skip_locked=True)
    ).all()
    settled: list[str] = []
    for uid, version in due:
        session.execute(
            _insert(session)(Job)
            .values(
                kind=JobKind.ANALYSE,
                study_instance_uid=uid,
                study_version=version,
                state=JobState.QUEUED,
                priority=priority,
                attempts=0,
                max_attempts=5,
                run_after=now,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing()
        )
        session.execute(
            update(Job)
            .where(Job.study_instance_uid == uid)
            .where(Job.study_version == version)
            .where(Job.state == JobState.QUEUED)
            .values(run_after=now)
        )
        changed = session.execute(
            update(Study)
            .where(Study.study_instance_uid == uid)
            .where(Study.state == StudyState.RECEIVING)
            .where(Study.version == version)
            .values(state=StudyState.QUEUED)
        )
        if changed.rowcount == 1:  # type: ignore[attr-defined]
            settled.append(uid)
    return settled
