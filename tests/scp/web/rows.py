"""Rows the console tests start from."""

from __future__ import annotations

from sqlalchemy import insert
from sqlalchemy.orm import Session

from storage.models import Study, utc_now


def insert_done_study(session: Session, study_instance_uid: str) -> None:
    """A study of one instance whose analysis is done."""
    now = utc_now()
    session.execute(
        insert(Study).values(
            study_instance_uid=study_instance_uid,
            state="done",
            first_received_at=now,
            last_received_at=now,
            settle_at=now,
            instance_count=1,
            series_count=1,
        )
    )
