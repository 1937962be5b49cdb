"""What an operator can do to a study or a delivery, besides ``ainode retry`` and ``ainode
complete`` (storage.studies): cancel a queued analysis, send a dead-lettered delivery again, and
the log of who did what from the web console.

Each change is one guarded UPDATE whose row count says whether it happened (DESIGN.md §9).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.models import (
    ConsoleAction,
    ConsoleLogout,
    DeliveryState,
    Job,
    JobKind,
    JobState,
    Outbox,
    Study,
    StudyState,
)


def record_action(
    session: Session, who: str, action: str, study_instance_uid: str | None, detail: str, now: dt.datetime
) -> None:
    """Keep who did what, when (in the same transaction as the action itself)."""
    session.execute(
        insert(ConsoleAction).values(
            at=now, who=who[:128], action=action[:32], study_instance_uid=study_instance_uid, detail=detail
        )
    )


def cancel_study(session: Session, study_instance_uid: str, who: str, now: dt.datetime) -> str:
    """Cancel the current version's analysis while it is still queued (not once a worker holds
    it: that one finishes, or ``ainode retry`` replaces it). The study ends ``skipped``, saying
    who cancelled it. Returns what happened, in words."""
    study = session.get(Study, study_instance_uid, with_for_update=True)
    if study is None:
        raise LookupError(f"no study {study_instance_uid} in the database")
    cancelled = session.execute(
        update(Job)
        .where(Job.kind == JobKind.ANALYSE)
        .where(Job.study_instance_uid == study_instance_uid)
        .where(Job.study_version == study.version)
        .where(Job.state == JobState.QUEUED)
        .values(state=JobState.CANCELLED, last_error=f"cancelled by {who}", updated_at=now)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    if cancelled != 1:
        return f"nothing to cancel: version {study.version} is {study.state}, not queued"
    session.execute(
        update(Study)
        .where(Study.study_instance_uid == study_instance_uid)
        .where(Study.version == study.version)
        .values(state=StudyState.SKIPPED, last_error=f"analysis cancelled by {who}")
        .execution_options(synchronize_session=False)
    )
    return f"version {study.version} cancelled"


def redeliver(session: Session, outbox_id: int, now: dt.datetime) -> str | None:
    """Send a dead-lettered delivery again, from its first attempt, now; the study shows
    ``sending`` again until it is delivered. Returns the study's UID, or None when the delivery
    is not dead-lettered (already sent, or sent again meanwhile)."""
    row = session.execute(
        update(Outbox)
        .where(Outbox.id == outbox_id)
        .where(Outbox.state == DeliveryState.DEAD)
        .values(
            state=DeliveryState.PENDING,
            attempts=0,
            next_attempt_at=now,
            lease_token=None,
            lease_expires_at=None,
            updated_at=now,
        )
        .returning(Outbox.study_instance_uid, Outbox.study_version)
    ).one_or_none()
    if row is None:
        return None
    session.execute(
        update(Study)
        .where(Study.study_instance_uid == row.study_instance_uid)
        .where(Study.version == row.study_version)
        .where(Study.state.in_([StudyState.FAILED, StudyState.DONE]))
        .values(state=StudyState.SENDING, last_error=None)
        .execution_options(synchronize_session=False)
    )
    return str(row.study_instance_uid)


def record_logout(session: Session, session_id: str, expires_at: dt.datetime) -> None:
    """A console session logged out: refused from now on until ``expires_at`` (idempotent)."""
    dialect = session.get_bind().dialect.name
    upsert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(
        upsert(ConsoleLogout).values(session=session_id[:64], expires_at=expires_at).on_conflict_do_nothing()
    )


def logged_out(session: Session, session_id: str) -> bool:
    return (
        session.scalar(select(ConsoleLogout.session).where(ConsoleLogout.session == session_id[:64]))
        is not None
    )


def forget_logouts(session: Session, now: dt.datetime) -> int:
    """Logouts of sessions that have expired anyway are no longer worth keeping."""
    result = session.execute(delete(ConsoleLogout).where(ConsoleLogout.expires_at < now))
    return int(result.rowcount or 0)  # type: ignore[attr-defined]
