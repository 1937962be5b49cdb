"""Recording received instances and settling studies.

A study is ready for analysis when nothing of it has arrived for ``study.settle_seconds`` and no
association is still sending it (the SCP keeps pushing ``settle_at`` while one is open). It then
gets exactly one analysis job per version: the job table's unique key (kind, study, version)
makes a second settle of the same version a no-op. Instances that arrive after analysis began
bump the version, so the late images are analysed again and the SR is versioned.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from sqlalchemy import Table, bindparam, delete, func, insert, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from conf.routing import Route, StudyFacts, match
from storage.models import (
    Installation,
    Instance,
    Job,
    JobKind,
    JobState,
    Outbox,
    Study,
    StudyState,
    VersionInstance,
)


class IngestOutcome(enum.StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes: nothing changes
    REPLACED = "replaced"  # same SOP Instance UID, new bytes: the study reopens
    OWN_OUTPUT = "own output"  # an SR this node made, sent back by the PACS: acknowledged, not kept


@dataclass(frozen=True)
class HeaderIndex:
    """Header facts kept in the database for series and slice choice (raw DICOM strings)."""

    modality: str | None = None
    image_type: str | None = None
    instance_number: str | None = None
    image_position_patient: str | None = None
    image_orientation_patient: str | None = None
    rows: int | None = None
    columns: int | None = None
    number_of_frames: str | None = None
    photometric_interpretation: str | None = None
    burned_in_annotation: str | None = None
    body_part_examined: str | None = None
    view_position: str | None = None


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
    header: HeaderIndex = HeaderIndex()


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


# Built once: constructing and cache-keying SQLAlchemy statements per C-STORE cost more than
# the fsyncs. Core tables, not ORM entities, so execution skips the ORM's persistence layer.
_instances = cast(Table, Instance.__table__)
_studies = cast(Table, Study.__table__)
_SELECT_EXISTING = (
    select(_instances.c.sha256, _instances.c.path, _instances.c.study_instance_uid)
    .where(_instances.c.sop_instance_uid == bindparam("sop"))
    .with_for_update()
)
_SERIES_SEEN = (
    select(_instances.c.id)
    .where(_instances.c.study_instance_uid == bindparam("study"))
    .where(_instances.c.series_instance_uid == bindparam("series"))
    .limit(1)
)
_INSERT_INSTANCE = insert(_instances)
_OWN_SR = select(Outbox.id).where(Outbox.sr_sop_instance_uid == bindparam("sop")).limit(1)
_LOCK_STUDY = (
    select(_studies.c.state, _studies.c.version, _studies.c.settle_at, _studies.c.files_purged_at)
    .where(_studies.c.study_instance_uid == bindparam("study"))
    .with_for_update()
)
# INSERT ... ON CONFLICT DO NOTHING, one per dialect (the clause is dialect-specific).
_INSERT_STUDY_IF_NEW = {
    name: dialect_insert(_studies)
    .values(
        study_instance_uid=bindparam("study"),
        state=StudyState.RECEIVING,
        version=1,
        instance_count=0,
        series_count=0,
        first_received_at=bindparam("now"),
        last_received_at=bindparam("now"),
        settle_at=bindparam("now"),
        calling_ae_title=bindparam("calling_ae"),
    )
    .on_conflict_do_nothing()
    for name, dialect_insert in (("postgresql", postgresql.insert), ("sqlite", sqlite.insert))
}
_UPDATE_STUDY_AFTER_NEW_INSTANCE = (
    update(_studies)
    .where(_studies.c.study_instance_uid == bindparam("b_study"))
    .values(
        instance_count=_studies.c.instance_count + 1,
        series_count=_studies.c.series_count + bindparam("b_new_series"),
        last_received_at=bindparam("b_now"),
        calling_ae_title=bindparam("b_calling_ae"),
        state=bindparam("b_state"),
        version=bindparam("b_version"),
        settle_at=bindparam("b_settle_at"),
        last_error=None,
    )
)


def record_instance(
    session: Session, received: ReceivedInstance, settle_seconds: float, now: dt.datetime
) -> IngestResult:
    """Record one durable instance file and update its study, in the caller's transaction."""
    conn = session.connection()
    if conn.execute(_OWN_SR, {"sop": received.sop_instance_uid}).first() is not None:
        # A PACS rule that forwards whole studies sends our SR back: analysing it again would
        # loop (new version, new SR, sent back ...).
        return IngestResult(IngestOutcome.OWN_OUTPUT)
    existing = conn.execute(_SELECT_EXISTING, {"sop": received.sop_instance_uid}).one_or_none()
    if existing is not None and existing.sha256 == received.sha256:
        return IngestResult(IngestOutcome.DUPLICATE)

    study = _lock_study(session, received, now)
    if study.files_purged_at is not None and now <= study.files_purged_at:
        # ``now`` was read before this commit waited for the lock a purge held: this instance
        # arrived after the purge and its file is on disk, so it must count as newer than it
        # (retention and the next version's set tell purged files by ``received_at``).
        now = study.files_purged_at + dt.timedelta(microseconds=1)
    reopened = _reopen(session, study, now + dt.timedelta(seconds=settle_seconds))
    if existing is None:
        series_seen = conn.execute(
            _SERIES_SEEN,
            {"study": received.study_instance_uid, "series": received.series_instance_uid},
        ).first()
        conn.execute(_INSERT_INSTANCE, {**_columns(received), "received_at": now})
        conn.execute(
            _UPDATE_STUDY_AFTER_NEW_INSTANCE,
            {
                "b_study": received.study_instance_uid,
                "b_new_series": int(series_seen is None),
                "b_now": now,
                "b_calling_ae": received.calling_ae_title,
                "b_state": reopened["state"],
                "b_version": reopened["version"],
                "b_settle_at": reopened["settle_at"],
            },
        )
        return IngestResult(IngestOutcome.STORED)

    # Replacement (rare): same SOP Instance UID, new bytes.
    conn.execute(
        update(_instances)
        .where(_instances.c.sop_instance_uid == received.sop_instance_uid)
        .values(**_columns(received), received_at=now)
    )
    if existing.study_instance_uid != received.study_instance_uid:
        _recount(session, existing.study_instance_uid)
    conn.execute(
        update(_studies)
        .where(_studies.c.study_instance_uid == received.study_instance_uid)
        .values(
            **_counts(session, received.study_instance_uid),
            **reopened,
            last_received_at=now,
            calling_ae_title=received.calling_ae_title,
        )
    )
    superseded = existing.path if existing.path != received.path else None
    return IngestResult(IngestOutcome.REPLACED, superseded)


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
        **dataclasses.asdict(received.header),
    }


@dataclass(frozen=True)
class _LockedStudy:
    study_instance_uid: str
    state: str
    version: int
    settle_at: dt.datetime
    files_purged_at: dt.datetime | None


def _lock_study(session: Session, received: ReceivedInstance, now: dt.datetime) -> _LockedStudy:
    # INSERT ... ON CONFLICT DO NOTHING then SELECT ... FOR UPDATE: two associations sending the
    # same new study at once both end up holding the one row, one after the other.
    conn = session.connection()
    conn.execute(
        _INSERT_STUDY_IF_NEW[conn.dialect.name],
        {"study": received.study_instance_uid, "now": now, "calling_ae": received.calling_ae_title},
    )
    row = conn.execute(_LOCK_STUDY, {"study": received.study_instance_uid}).one()
    return _LockedStudy(
        received.study_instance_uid, row.state, row.version, row.settle_at, row.files_purged_at
    )


def _counts(session: Session, study_instance_uid: str) -> dict[str, int]:
    instances, series = session.execute(
        select(func.count(Instance.id), func.count(func.distinct(Instance.series_instance_uid))).where(
            Instance.study_instance_uid == study_instance_uid
        )
    ).one()
    return {"instance_count": instances, "series_count": series}


def _recount(session: Session, study_instance_uid: str) -> None:
    session.execute(
        update(Study)
        .where(Study.study_instance_uid == study_instance_uid)
        .values(**_counts(session, study_instance_uid))
    )


def _reopen(session: Session, study: _LockedStudy, settle_at: dt.datetime) -> dict[str, object]:
    """New data for a study: receiving again, settle later, and a new version if analysis of
    the current one has begun (its job is no longer waiting in the queue). Returns the study
    columns to set."""
    version = study.version
    if study.state in (StudyState.QUEUED, StudyState.WAITING):
        # Still unclaimed: keep its job, just push it back (debounce, not a second job).
        session.execute(
            update(Job)
            .where(Job.study_instance_uid == study.study_instance_uid)
            .where(Job.study_version == study.version)
            .where(Job.state == JobState.QUEUED)
            .values(run_after=settle_at)
        )
    elif study.state != StudyState.RECEIVING:
        version += 1
    return {
        "state": StudyState.RECEIVING,
        "version": version,
        "settle_at": max(study.settle_at, settle_at),
        "last_error": None,
    }


def update_study_version(
    session: Session,
    study_instance_uid: str,
    version: int,
    values: dict[str, object],
    in_states: Iterable[StudyState] | None = None,
) -> bool:
    """Set ``values`` on the study only while it is still at ``version`` (and, if given, in one
    of ``in_states``): work on an older version must not move a study that late images have
    reopened. Returns whether the row changed."""
    statement = (
        update(Study).where(Study.study_instance_uid == study_instance_uid).where(Study.version == version)
    )
    if in_states is not None:
        statement = statement.where(Study.state.in_(list(in_states)))
    return bool(session.execute(statement.values(**values)).rowcount == 1)  # type: ignore[attr-defined]


def requeue_study(
    session: Session, study_instance_uid: str, now: dt.datetime, routes: Sequence[Route] = ()
) -> int:
    """``ainode retry``: a new version of the study, queued at once through the same routing as
    settling (a new analysis, a new SR version that names its predecessor; the old version's
    queued job is cancelled at the next claim). Returns the new version."""
    study = session.execute(
        select(Study.version).where(Study.study_instance_uid == study_instance_uid).with_for_update()
    ).scalar_one_or_none()
    if study is None:
        raise LookupError(f"no study {study_instance_uid} in the database")
    version = study + 1
    session.execute(
        update(Study)
        .where(Study.study_instance_uid == study_instance_uid)
        .values(version=version, state=StudyState.RECEIVING, settle_at=now, last_error=None)
    )
    settle_due(session, now, routes=routes, only=study_instance_uid)
    return version


def complete_study(
    session: Session, study_instance_uid: str, now: dt.datetime, routes: Sequence[Route] = ()
) -> str:
    """``ainode complete``: the study is complete now (a modality that keeps its association
    open, a series known to be last): queue its current version through the routes without
    waiting out the settle time. Returns the state it is in afterwards."""
    row = session.execute(
        select(Study.state).where(Study.study_instance_uid == study_instance_uid).with_for_update()
    ).scalar_one_or_none()
    if row is None:
        raise LookupError(f"no study {study_instance_uid} in the database")
    if row != StudyState.RECEIVING:
        return str(row)  # already settled (queued, analysing, done ...): nothing to complete
    session.execute(update(Study).where(Study.study_instance_uid == study_instance_uid).values(settle_at=now))
    settle_due(session, now, routes=routes, only=study_instance_uid)
    return str(session.scalar(select(Study.state).where(Study.study_instance_uid == study_instance_uid)))


def fix_instance_set(session: Session, study_instance_uid: str, version: int) -> int:
    """Record the study's instances now as the set of ``version`` (replacing a set recorded
    before a late instance reopened the still unclaimed version). Returns its size."""
    session.execute(
        delete(VersionInstance)
        .where(VersionInstance.study_instance_uid == study_instance_uid)
        .where(VersionInstance.study_version == version)
    )
    present = select(Instance.study_instance_uid, literal(version), Instance.sop_instance_uid).where(
        Instance.study_instance_uid == study_instance_uid
    )
    purged_at = session.scalar(
        select(Study.files_purged_at).where(Study.study_instance_uid == study_instance_uid)
    )
    if purged_at is not None:  # retention deleted those files: a later version has only the rest
        present = present.where(Instance.received_at > purged_at)
    result = session.execute(
        insert(VersionInstance).from_select(
            ["study_instance_uid", "study_version", "sop_instance_uid"], present
        )
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def instance_set(session: Session, study_instance_uid: str, version: int) -> set[str] | None:
    """The SOP Instance UIDs fixed for ``version``, or None if none was recorded (a version
    queued before sets were kept)."""
    uids = set(
        session.scalars(
            select(VersionInstance.sop_instance_uid)
            .where(VersionInstance.study_instance_uid == study_instance_uid)
            .where(VersionInstance.study_version == version)
        )
    )
    return uids or None


def hold_queued(session: Session, reason: str) -> int:
    """Queued studies move to ``waiting`` with ``reason`` as their last error: the node stores
    and queues them but cannot analyse them yet (no API key). Their jobs stay queued, so a node
    started with a key takes them at once. Returns how many studies moved."""
    result = session.execute(
        update(Study)
        .where(Study.state == StudyState.QUEUED)
        .values(state=StudyState.WAITING, last_error=reason)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def extend_settle(session: Session, study_instance_uids: Iterable[str] | None, until: dt.datetime) -> int:
    """Keep studies that an open association is still sending from settling until ``until``.

    ``None``: every study still receiving, as at start: their associations were cut when the
    node stopped or died and their modalities will send again; without this the instances that
    made it would settle at once, and the resent rest would open a second version."""
    statement = update(Study).where(Study.state == StudyState.RECEIVING).where(Study.settle_at < until)
    if study_instance_uids is not None:
        uids = sorted(set(study_instance_uids))
        if not uids:
            return 0
        statement = statement.where(Study.study_instance_uid.in_(uids))
    result = session.execute(statement.values(settle_at=until))
    return int(result.rowcount)  # type: ignore[attr-defined]


def study_facts(session: Session, study_instance_uid: str) -> StudyFacts:
    rows = session.execute(
        select(
            Instance.modality, Instance.body_part_examined, Instance.calling_ae_title, Instance.sop_class_uid
        )
        .where(Instance.study_instance_uid == study_instance_uid)
        .distinct()
    ).all()
    return StudyFacts(
        modalities=frozenset(r[0] for r in rows if r[0]),
        body_parts=frozenset(r[1] for r in rows if r[1]),
        calling_aets=frozenset(r[2] for r in rows if r[2]),
        sop_classes=frozenset(r[3] for r in rows if r[3]),
    )


def settle_due(
    session: Session,
    now: dt.datetime,
    priority: int = 0,
    routes: Sequence[Route] = (),
    only: str | None = None,
) -> list[str]:
    """Queue every receiving study whose settle time has passed; return their UIDs.

    With ``routes``, the first matching route sets the job's priority and is recorded on it; a
    study no route matches, or whose route says skip, is marked skipped instead.
    Safe to run from several processes at once: rows are locked (SKIP LOCKED on PostgreSQL,
    the write lock on SQLite), and the job's unique key turns a repeat into a no-op.
    """
    query = (
        select(Study.study_instance_uid, Study.version)
        .where(Study.state == StudyState.RECEIVING)
        .where(Study.settle_at <= now)
        .order_by(Study.settle_at)
        .with_for_update(skip_locked=True)
    )
    if only is not None:  # ainode retry / complete: this study alone
        query = query.where(Study.study_instance_uid == only)
    due = session.execute(query).all()
    settled: list[str] = []
    for uid, version in due:
        route_name: str | None = None
        job_priority = priority
        if routes:
            route = match(routes, study_facts(session, uid))
            if route is None or route.action == "skip":
                reason = "no routing rule matched" if route is None else f'route "{route.name}" skips it'
                update_study_version(
                    session,
                    uid,
                    version,
                    {"state": StudyState.SKIPPED, "last_error": f"not analysed: {reason}"},
                    in_states=[StudyState.RECEIVING],
                )
                continue
            route_name, job_priority = route.name, route.priority
        session.execute(
            _insert(session)(Job)
            .values(
                kind=JobKind.ANALYSE,
                study_instance_uid=uid,
                study_version=version,
                state=JobState.QUEUED,
                priority=job_priority,
                route=route_name,
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
        if update_study_version(session, uid, version, {"state": StudyState.QUEUED}, [StudyState.RECEIVING]):
            fix_instance_set(session, uid, version)
            settled.append(uid)
    return settled


def installation_namespace(session: Session) -> uuid.UUID:
    """This installation's random value (one row, made by migration 0010)."""
    return uuid.UUID(session.scalars(select(Installation.uid_namespace).where(Installation.id == 1)).one())
