"""Retention: instance files are deleted ``storage.retention_days`` after every SR delivery of
their study succeeded, never before (a pending, retrying or dead delivery keeps them)."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import and_, case, func, select, update
from sqlalchemy.orm import Session

from storage.files import InstanceStore
from storage.models import DeliveryState, Instance, Outbox, Study, StudyState


def purge_delivered(session: Session, store: InstanceStore, days: float, now: dt.datetime) -> list[str]:
    """Delete the instance files of studies whose SRs were all delivered ``days`` ago or more;
    return the study UIDs purged. The rows stay (history, status); the files go."""
    if days <= 0:
        return []
    cutoff = now - dt.timedelta(days=days)
    delivered = (
        select(Outbox.study_instance_uid)
        .group_by(Outbox.study_instance_uid)
        # Every delivery sent, the last one before the cutoff: a pending or dead one keeps the files.
        .having(func.sum(case((Outbox.state != DeliveryState.SENT, 1), else_=0)) == 0)
        .having(func.max(Outbox.sent_at) <= cutoff)
    )
    studies = session.scalars(
        select(Study.study_instance_uid)
        .where(and_(Study.state == StudyState.DONE, Study.files_purged_at.is_(None)))
        .where(Study.study_instance_uid.in_(delivered))
        .with_for_update(skip_locked=True)
    ).all()
    for uid in studies:
        for path in session.scalars(select(Instance.path).where(Instance.study_instance_uid == uid)):
            store.remove(path)
        session.execute(update(Study).where(Study.study_instance_uid == uid).values(files_purged_at=now))
    return list(studies)
