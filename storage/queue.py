"""The job queue: claim with a lease, heartbeat, complete, fail with backoff, reap expired leases.

Every state change after the claim is one UPDATE guarded by (id, state, lease_token) whose row
count is checked: a worker whose lease expired and whose job was handed to another worker gets
:class:`LeaseLost` instead of overwriting the new owner's work. A claim leases a job; it never
deletes it. All functions take ``now`` so lease tests never sleep.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from storage.errors import LeaseLost
from storage.models import Job, JobClaim, JobKind, JobState, Study, StudyState
from storage.owners import orphaned
from storage.studies import update_study_version

BACKOFF_BASE_SECONDS = 30.0
BACKOFF_CAP_SECONDS = 3600.0


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    kind: str
    study_instance_uid: str
    study_version: int
    attempts: int
    max_attempts: int
    lease_token: str
    lease_expires_at: dt.datetime


def backoff_seconds(attempts: int) -> float:
    """Delay before attempt ``attempts + 1``: 30 s, 60 s, 120 s ... capped at an hour."""
    if attempts < 1:
        raise ValueError(f'Argument "attempts" must be at least 1, got {attempts}')
    return float(min(BACKOFF_BASE_SECONDS * 2 ** (attempts - 1), BACKOFF_CAP_SECONDS))


def claim(
    session: Session, kind: str, owner: str, lease_seconds: float, now: dt.datetime
) -> ClaimedJob | None:
    """Lease the most urgent runnable job of ``kind``, or return None.

    One statement: UPDATE ... WHERE id = (SELECT id ... LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING. On PostgreSQL, SKIP LOCKED lets concurrent workers take different rows without
    waiting; on SQLite the FOR UPDATE renders as nothing and the BEGIN IMMEDIATE every
    transaction starts with (storage.db) serialises claimers instead.
    """
    if lease_seconds <= 0:
        raise ValueError(f'Argument "lease_seconds" must be positive, got {lease_seconds}')
    token = str(uuid.uuid4())
    expires = now + dt.timedelta(seconds=lease_seconds)
    cancel_superseded(session, now)
    candidate = (
        select(Job.id)
        # Only a settled study at this job's version: a study receiving again (a late series)
        # is not analysed until it settles again, and an older version's job never runs.
        .join(
            Study,
            (Study.study_instance_uid == Job.study_instance_uid) & (Study.version == Job.study_version),
        )
        .where(Study.state.in_([StudyState.QUEUED, StudyState.WAITING]))
        .where(Job.kind == kind)
        .where(Job.state == JobState.QUEUED)
        .where(Job.run_after <= now)
        .order_by(Job.priority.desc(), Job.run_after, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    row = session.execute(
        update(Job)
        .where(Job.id == candidate)
        .where(Job.state == JobState.QUEUED)
        .values(
            state=JobState.RUNNING,
            lease_owner=owner,
            lease_token=token,
            lease_expires_at=expires,
            attempts=Job.attempts + 1,
            updated_at=now,
        )
        .returning(
            Job.id,
            Job.kind,
            Job.study_instance_uid,
            Job.study_version,
            Job.attempts,
            Job.max_attempts,
        )
    ).one_or_none()
    if row is None:
        return None
    job = ClaimedJob(row[0], row[1], row[2], row[3], row[4], row[5], token, expires)
    session.execute(  # each claim, for the console's timeline
        insert(JobClaim).values(
            job_id=job.id,
            study_instance_uid=job.study_instance_uid,
            study_version=job.study_version,
            attempt=job.attempts,
            claimed_at=now,
            owner=owner[:128],
        )
    )
    if job.kind == JobKind.ANALYSE:
        # A study that waited for a key no longer does: its reason goes with the wait.
        update_study_version(
            session,
            job.study_instance_uid,
            job.study_version,
            {"last_error": None},
            in_states=[StudyState.WAITING],
        )
        _set_study_state(session, job, StudyState.ANALYSING)
    return job


def cancel_superseded(session: Session, now: dt.datetime) -> int:
    """Cancel queued analyses of study versions that are no longer current (late images or
    ``ainode retry`` opened a newer one): running them would analyse the wrong instance set and
    could land after the newer SR. Returns how many were cancelled."""
    current = (
        select(Study.version).where(Study.study_instance_uid == Job.study_instance_uid).scalar_subquery()
    )
    result = session.execute(
        update(Job)
        .where(Job.state == JobState.QUEUED)
        .where(Job.study_version < current)
        .values(
            state=JobState.CANCELLED,
            last_error="superseded: a newer version of the study was opened",
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def store_findings(session: Session, job: ClaimedJob, findings_json: str, now: dt.datetime) -> None:
    """Commit the model's findings on the job (guarded by the lease) before anything else is
    built from them."""
    _apply(session, job, {"findings_json": findings_json, "updated_at": now}, "store findings")


def stored_findings(session: Session, job: ClaimedJob) -> str | None:
    """Findings an earlier attempt of this job committed, if any."""
    return session.scalar(select(Job.findings_json).where(Job.id == job.id))


def postpone(session: Session, job: ClaimedJob, until: dt.datetime, reason: str, now: dt.datetime) -> None:
    """Back to the queue until ``until`` without spending an attempt: the provider is down (its
    circuit is open), not this study's fault. ``reason`` keeps the cause for ``ainode status``."""
    _requeue(
        session, job, until, now, "postpone", {"attempts": Job.attempts - 1, "last_error": reason}, reason
    )


def _guarded(job: ClaimedJob):  # type: ignore[no-untyped-def]
    return (
        update(Job)
        .where(Job.id == job.id)
        .where(Job.state == JobState.RUNNING)
        .where(Job.lease_token == job.lease_token)
    )


def _apply(session: Session, job: ClaimedJob, values: dict[str, object], action: str) -> None:
    result = session.execute(_guarded(job).values(**values))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLost(f"job {job.id}: lease {job.lease_token} no longer held, cannot {action}")


def _set_study_state(session: Session, job: ClaimedJob, state: StudyState, error: str | None = None) -> None:
    # Only the current version's job may move the study: a late instance may have reopened it.
    values: dict[str, object] = {"state": state}
    if error is not None:
        values["last_error"] = error
    update_study_version(
        session,
        job.study_instance_uid,
        job.study_version,
        values,
        in_states=[StudyState.QUEUED, StudyState.WAITING, StudyState.ANALYSING, StudyState.SENDING],
    )


def heartbeat(session: Session, job: ClaimedJob, lease_seconds: float, now: dt.datetime) -> ClaimedJob:
    """Extend the lease; raise :class:`LeaseLost` if it is no longer ours."""
    expires = now + dt.timedelta(seconds=lease_seconds)
    _apply(session, job, {"lease_expires_at": expires, "updated_at": now}, "heartbeat")
    return ClaimedJob(
        job.id,
        job.kind,
        job.study_instance_uid,
        job.study_version,
        job.attempts,
        job.max_attempts,
        job.lease_token,
        expires,
    )


def complete(session: Session, job: ClaimedJob, now: dt.datetime) -> None:
    _apply(
        session,
        job,
        {
            "state": JobState.SUCCEEDED,
            "lease_expires_at": None,
            "updated_at": now,
            "last_error": None,
        },
        "complete",
    )


def fail(
    session: Session,
    job: ClaimedJob,
    error: str,
    now: dt.datetime,
    retryable: bool = True,
    retry_in_seconds: float | None = None,
) -> JobState:
    """Record a failure: queue again after a backoff (or ``retry_in_seconds``) while attempts
    remain, else fail for good."""
    if retryable and job.attempts < job.max_attempts:
        delay = backoff_seconds(job.attempts) if retry_in_seconds is None else retry_in_seconds
        _requeue(session, job, now + dt.timedelta(seconds=delay), now, "fail", {"last_error": error}, error)
        return JobState.QUEUED
    _apply(
        session,
        job,
        {
            "state": JobState.FAILED,
            "lease_expires_at": None,
            "last_error": error,
            "updated_at": now,
        },
        "fail",
    )
    if job.kind == JobKind.ANALYSE:
        _set_study_state(session, job, StudyState.FAILED, error)
    return JobState.FAILED


def release(session: Session, job: ClaimedJob, now: dt.datetime) -> None:
    """Give a job back untouched (shutdown): queued again at once, the attempt not counted."""
    _requeue(session, job, now, now, "release", {"attempts": Job.attempts - 1})


def _requeue(
    session: Session,
    job: ClaimedJob,
    run_after: dt.datetime,
    now: dt.datetime,
    action: str,
    extra: dict[str, object],
    error: str | None = None,
) -> None:
    """Back to the queue without an owner; the study follows when it is this version's job."""
    values: dict[str, object] = {
        "state": JobState.QUEUED,
        "run_after": run_after,
        "lease_owner": None,
        "lease_token": None,
        "lease_expires_at": None,
        "updated_at": now,
        **extra,
    }
    _apply(session, job, values, action)
    if job.kind == JobKind.ANALYSE:
        _set_study_state(session, job, StudyState.QUEUED, error)


def reclaim_orphans(session: Session, host: str, alive: Callable[[int], bool], now: dt.datetime) -> list[int]:
    """At start: jobs leased by a process of this host (owner ``host:pid:incarnation``) that is gone are
    queued again at once, instead of waiting out their lease (:func:`storage.owners.orphaned`).
    Other hosts' leases lapse as usual. Returns the ids it requeued."""
    running = session.execute(
        select(Job.id, Job.lease_owner)
        .where(Job.state == JobState.RUNNING)
        .where(Job.lease_owner.like(f"{host}:%"))
        .with_for_update(skip_locked=True)
    ).all()
    orphans = [job_id for job_id, owner in running if orphaned(owner, host, alive)]
    return _requeue_now(session, orphans, "its worker process on this host is gone", now)


def _requeue_now(session: Session, job_ids: list[int], reason: str, now: dt.datetime) -> list[int]:
    rows = session.execute(
        select(
            Job.id,
            Job.kind,
            Job.study_instance_uid,
            Job.study_version,
            Job.attempts,
            Job.max_attempts,
            Job.lease_token,
            Job.lease_expires_at,
        ).where(Job.id.in_(job_ids))
    ).all()
    done: list[int] = []
    for job_id, kind, study, version, attempts, max_attempts, token, expires in rows:
        job = ClaimedJob(job_id, kind, study, version, attempts, max_attempts, token or "", expires or now)
        try:
            fail(session, job, reason, now, retryable=True, retry_in_seconds=0)
        except LeaseLost:
            continue
        done.append(job_id)
    return done


def reap_expired(session: Session, now: dt.datetime) -> list[int]:
    """Return jobs whose lease expired (their worker died) to the queue at once, or fail them
    when their attempts are used up. Returns the ids it changed."""
    expired = session.scalars(
        select(Job.id)
        .where(Job.state == JobState.RUNNING)
        .where(Job.lease_expires_at < now)
        .with_for_update(skip_locked=True)
    ).all()
    return _requeue_now(session, list(expired), "lease expired: the worker holding it stopped", now)
