"""The SR outbox: what must reach which PACS, retried per destination, never sent twice by us.

A row is leased by the sender (guarded updates, as for jobs); success and warnings complete it;
0xA7xx and connection failures retry with backoff; any other refusal is dead-lettered with the
reason. When every row of an SR is settled, the study is done (or failed, naming the dead
destination). Each attempt's end (sent, retry, dead, or interrupted by the death of the process
sending it) is recorded in ``delivery_attempts`` in the same transaction as the row's new state.
All functions take ``now``.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.errors import LeaseLost
from storage.models import DeliveryAttempt, DeliveryOutcome, DeliveryState, Outbox, StudyState
from storage.owners import orphaned
from storage.studies import update_study_version


@dataclass(frozen=True)
class Delivery:
    id: int
    destination: str
    study_instance_uid: str
    study_version: int
    sr_path: str
    sr_sop_instance_uid: str
    attempts: int
    lease_token: str
    claimed_at: dt.datetime | None = None  # when this attempt began


def retry_delay(attempts: int, base_seconds: float = 15.0, cap_seconds: float = 900.0) -> float:
    """15 s, 30 s, 60 s ... capped at 15 minutes: a PACS down for a minute gets its SR soon after."""
    if attempts < 1:
        raise ValueError(f'Argument "attempts" must be at least 1, got {attempts}')
    return float(min(base_seconds * 2 ** (attempts - 1), cap_seconds))


def enqueue(
    session: Session,
    study_instance_uid: str,
    study_version: int,
    sr_path: str,
    sr_sop_instance_uid: str,
    destinations: Iterable[str],
    now: dt.datetime,
    is_report: bool = True,
) -> int:
    """Queue a file the node made for each destination (idempotent) and mark the study as
    sending. ``is_report``: the SR, whose UID the study shows; False for companions such as the
    Secondary Capture summary, delivered and retried the same way."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    count = 0
    for destination in destinations:
        result = session.execute(
            insert(Outbox)
            .values(
                study_instance_uid=study_instance_uid,
                study_version=study_version,
                destination=destination,
                sr_path=sr_path,
                sr_sop_instance_uid=sr_sop_instance_uid,
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing()
        )
        count += int(result.rowcount or 0)  # type: ignore[attr-defined]
    update_study_version(
        session,
        study_instance_uid,
        study_version,
        # The SR is committed: earlier errors of this version (retries, a wait for a key) are over.
        {"state": StudyState.SENDING, "sr_sop_instance_uid": sr_sop_instance_uid, "last_error": None}
        if is_report
        else {"state": StudyState.SENDING},
    )
    return count


def claim(
    session: Session, destination: str, lease_seconds: float, now: dt.datetime, owner: str | None = None
) -> Delivery | None:
    """Lease the oldest due delivery for ``destination``; expired leases are due again.
    ``owner`` (``host:pid``) lets a restarted process take back what it held when it died."""
    token = str(uuid.uuid4())
    due = (
        select(Outbox.id)
        .where(Outbox.destination == destination)
        .where(
            ((Outbox.state == DeliveryState.PENDING) & (Outbox.next_attempt_at <= now))
            | ((Outbox.state == DeliveryState.SENDING) & (Outbox.lease_expires_at < now))
        )
        .order_by(Outbox.next_attempt_at, Outbox.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    row = session.execute(
        update(Outbox)
        .where(Outbox.id == due)
        .values(
            state=DeliveryState.SENDING,
            lease_token=token,
            lease_expires_at=now + dt.timedelta(seconds=lease_seconds),
            lease_owner=owner,
            attempts=Outbox.attempts + 1,
            updated_at=now,
        )
        .returning(
            Outbox.id,
            Outbox.destination,
            Outbox.study_instance_uid,
            Outbox.study_version,
            Outbox.sr_path,
            Outbox.sr_sop_instance_uid,
            Outbox.attempts,
        )
    ).one_or_none()
    return None if row is None else Delivery(*row, lease_token=token, claimed_at=now)


def reclaim_orphans(session: Session, host: str, alive: Callable[[int], bool], now: dt.datetime) -> int:
    """At start: deliveries a process of this host was sending when it died are due again now
    (the PACS may have stored the SR already: it gets the same SOP Instance UID again, which a
    PACS keeps once). Returns how many."""
    rows = session.execute(
        select(
            Outbox.id,
            Outbox.lease_owner,
            Outbox.study_instance_uid,
            Outbox.study_version,
            Outbox.destination,
            Outbox.attempts,
            Outbox.updated_at,
        )
        .where(Outbox.state == DeliveryState.SENDING)
        .where(Outbox.lease_owner.like(f"{host}:%"))
        .with_for_update(skip_locked=True)
    ).all()
    stopped = [row for row in rows if orphaned(row.lease_owner, host, alive)]
    dead = [row.id for row in stopped]
    if dead:
        session.execute(
            update(Outbox)
            .where(Outbox.id.in_(dead))
            .where(Outbox.state == DeliveryState.SENDING)
            .values(
                state=DeliveryState.PENDING,
                next_attempt_at=now,
                lease_token=None,
                lease_expires_at=None,
                lease_owner=None,
                last_error="the process sending it stopped",
                updated_at=now,
            )
        )
        session.execute(
            insert(DeliveryAttempt),
            [
                {
                    "outbox_id": row.id,
                    "study_instance_uid": row.study_instance_uid,
                    "study_version": row.study_version,
                    "destination": row.destination,
                    "attempt": row.attempts,
                    "started_at": row.updated_at,  # the claim's time
                    "ended_at": now,
                    "outcome": DeliveryOutcome.INTERRUPTED,
                    "status": None,
                    "error": "the process sending it stopped",
                }
                for row in stopped
            ],
        )
    return len(dead)


def _finish(
    session: Session,
    delivery: Delivery,
    values: dict[str, object],
    action: str,
    outcome: DeliveryOutcome,
    now: dt.datetime,
) -> None:
    result = session.execute(
        update(Outbox)
        .where(Outbox.id == delivery.id)
        .where(Outbox.state == DeliveryState.SENDING)
        .where(Outbox.lease_token == delivery.lease_token)
        .values(**values)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLost(f"outbox {delivery.id}: lease {delivery.lease_token} no longer held, cannot {action}")
    session.execute(
        insert(DeliveryAttempt).values(
            outbox_id=delivery.id,
            study_instance_uid=delivery.study_instance_uid,
            study_version=delivery.study_version,
            destination=delivery.destination,
            attempt=delivery.attempts,
            started_at=delivery.claimed_at,
            ended_at=now,
            outcome=outcome,
            status=values.get("last_status"),
            error=values.get("last_error"),
        )
    )
    _settle_study(session, delivery)


def mark_sent(session: Session, delivery: Delivery, status: int, now: dt.datetime) -> None:
    _finish(
        session,
        delivery,
        {
            "state": DeliveryState.SENT,
            "sent_at": now,
            "updated_at": now,
            "last_status": status,
            "last_error": None,
            "lease_expires_at": None,
        },
        "mark sent",
        DeliveryOutcome.SENT,
        now,
    )


def mark_retry(
    session: Session,
    delivery: Delivery,
    error: str,
    status: int | None,
    now: dt.datetime,
    delay_seconds: float | None = None,
) -> None:
    delay = retry_delay(delivery.attempts) if delay_seconds is None else delay_seconds
    _finish(
        session,
        delivery,
        {
            "state": DeliveryState.PENDING,
            "last_error": error,
            "last_status": status,
            "updated_at": now,
            "next_attempt_at": now + dt.timedelta(seconds=delay),
            "lease_token": None,
            "lease_expires_at": None,
        },
        "retry",
        DeliveryOutcome.RETRY,
        now,
    )


def mark_dead(session: Session, delivery: Delivery, error: str, status: int | None, now: dt.datetime) -> None:
    _finish(
        session,
        delivery,
        {
            "state": DeliveryState.DEAD,
            "last_error": error,
            "last_status": status,
            "updated_at": now,
            "lease_expires_at": None,
        },
        "dead-letter",
        DeliveryOutcome.DEAD,
        now,
    )


def _settle_study(session: Session, delivery: Delivery) -> None:
    states = session.execute(
        select(Outbox.destination, Outbox.state, Outbox.last_error)
        .where(Outbox.study_instance_uid == delivery.study_instance_uid)
        .where(Outbox.study_version == delivery.study_version)  # the SR and its companions
    ).all()
    if any(state in (DeliveryState.PENDING, DeliveryState.SENDING) for _, state, _ in states):
        return
    dead = [f"{dest}: {error}" for dest, state, error in states if state == DeliveryState.DEAD]
    update_study_version(
        session,
        delivery.study_instance_uid,
        delivery.study_version,
        {
            "state": StudyState.FAILED if dead else StudyState.DONE,
            "last_error": ("SR delivery failed: " + "; ".join(dead))[:2000] if dead else None,
        },
        in_states=[StudyState.SENDING],
    )
