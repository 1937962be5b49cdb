"""Retention: instance files are deleted ``storage.retention_days`` after their study's last
activity, once the study has ended: done (every SR delivery sent, or none to send), skipped or
failed. A pending or sending delivery keeps them. Instances that arrive after a purge open a new
version and are kept until that version has ended too, then purged the same way."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session

from storage.files import InstanceStore
from storage.models import DeliveryState, Instance, Outbox, Study, StudyState

ENDED = (StudyState.DONE, StudyState.SKIPPED, StudyState.FAILED)


def purge_ended(session: Session, store: InstanceStore, days: float, now: dt.datetime) -> list[str]:
    """Delete the instance files of studies that ended ``days`` ago or more (by their last
    instance received and their last delivery attempt); return the study UIDs purged. The rows
    stay (history, status); the files go."""
    if days <= 0:
        return []
    cutoff = now - dt.timedelta(days=days)
    busy_or_recent = (
        select(Outbox.study_instance_uid)
        .where(
            or_(
                Outbox.state.in_([DeliveryState.PENDING, DeliveryState.SENDING]),
                Outbox.updated_at > cutoff,
            )
        )
        .distinct()
    )
    unpurged_files = exists().where(
        and_(
            Instance.study_instance_uid == Study.study_instance_uid,
            or_(Study.files_purged_at.is_(None), Instance.received_at > Study.files_purged_at),
        )
    )
    studies = session.execute(
        select(Study.study_instance_uid, Study.files_purged_at)
        .where(Study.state.in_(ENDED))
        .where(Study.last_received_at <= cutoff)
        .where(Study.study_instance_uid.not_in(busy_or_recent))
        .where(unpurged_files)
        .with_for_update(skip_locked=True)
    ).all()
    for uid, purged_at in studies:
        paths = select(Instance.path).where(Instance.study_instance_uid == uid)
        if purged_at is not None:  # the files of the earlier purge are gone already
            paths = paths.where(Instance.received_at > purged_at)
        for path in session.scalars(paths):
            store.remove(path)
        session.execute(update(Study).where(Study.study_instance_uid == uid).values(files_purged_at=now))
    return [uid for uid, _ in studies]
