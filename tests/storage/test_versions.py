"""The studies page's rows: one per study version, newest first (storage.overview.version_page),
each with its own state, attempts, cost and SR; and the delivery history the sender writes
(storage.outbox: one delivery_attempts row per attempt, when it ends)."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from storage import outbox
from storage.db import transaction
from storage.models import ApiCall, DeliveryAttempt, Job, Outbox, Study
from storage.overview import VERSION_STATES, StudyFilter, count_versions, study_detail, version_page

T0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def _study(
    session: Session, uid: str, version: int, state: str, minute: float, sr: str | None = None
) -> None:
    session.execute(
        insert(Study).values(
            study_instance_uid=uid,
            state=state,
            version=version,
            first_received_at=at(0),
            last_received_at=at(minute),
            settle_at=at(minute),
            calling_ae_title="CT01",
            instance_count=3,
            series_count=1,
            sr_sop_instance_uid=sr,
        )
    )


def _job(
    session: Session,
    uid: str,
    version: int,
    state: str,
    minute: float,
    findings: bool = True,
    cost: float = 0,
    attempts: int | None = None,
) -> None:
    job_id = session.execute(
        insert(Job)
        .values(
            kind="analyse",
            study_instance_uid=uid,
            study_version=version,
            state=state,
            attempts=version if attempts is None else attempts,
            findings_json='{"findings": []}' if findings else None,
            run_after=at(minute),
            created_at=at(minute),
            updated_at=at(minute),
        )
        .returning(Job.id)
    ).scalar_one()
    if cost:
        session.execute(
            insert(ApiCall).values(
                study_instance_uid=uid,
                job_id=job_id,
                provider="openai",
                model="m",
                images=1,
                prompt_tokens=1,
                completion_tokens=1,
                cost_usd=cost,
                latency_ms=1.0,
                status=200,
                called_at=at(minute),
            )
        )


def _send(session: Session, uid: str, version: int, state: str, minute: float, sr: str) -> None:
    session.execute(
        insert(Outbox).values(
            study_instance_uid=uid,
            study_version=version,
            destination="pacs",
            sr_path=f"sr/{uid}/{sr}.x.dcm",
            sr_sop_instance_uid=sr,
            state=state,
            attempts=1,
            last_error="refused" if state == "dead" else None,
            next_attempt_at=at(minute),
            created_at=at(minute),
            updated_at=at(minute),
        )
    )


# (uid, version): the state the page must show for it.
EXPECTED = {
    ("1.1", 1): "failed",  # its SR was dead-lettered
    ("1.1", 2): "superseded",  # version 3 opened before it ran
    ("1.1", 3): "done",  # the current version: the study's state
    ("1.2", 1): "sending",  # still being delivered while version 2 receives
    ("1.2", 2): "receiving",  # no job yet
    ("1.3", 1): "skipped",  # skipped by the routes: no job at all
    ("1.4", 1): "skipped",  # succeeded without findings or anything to send: nothing to analyse
    ("1.4", 2): "analysing",
    ("1.5", 1): "analysing",  # a worker still runs it
    ("1.5", 2): "queued",
    ("1.6", 1): "failed",  # its analysis failed
    ("1.6", 2): "done",
}


@pytest.fixture
def versions(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    with transaction(sessions) as s:
        _study(s, "1.1", 3, "done", 30, sr="2.25.13")
        _job(s, "1.1", 1, "succeeded", 10, cost=0.01)
        _send(s, "1.1", 1, "dead", 11, "2.25.11")
        _job(s, "1.1", 2, "cancelled", 20)
        _job(s, "1.1", 3, "succeeded", 30, cost=0.02)
        _send(s, "1.1", 3, "sent", 31, "2.25.13")
        _study(s, "1.2", 2, "receiving", 45)
        _job(s, "1.2", 1, "succeeded", 12, cost=0.04)
        _send(s, "1.2", 1, "pending", 13, "2.25.21")
        _study(s, "1.3", 1, "skipped", 14)
        _study(s, "1.4", 2, "analysing", 40)
        _job(s, "1.4", 1, "succeeded", 15, findings=False)
        _job(s, "1.4", 2, "running", 40)
        _study(s, "1.5", 2, "queued", 41)
        _job(s, "1.5", 1, "running", 16)
        _job(s, "1.5", 2, "queued", 41)
        _study(s, "1.6", 2, "done", 42)
        _job(s, "1.6", 1, "failed", 17)
        _job(s, "1.6", 2, "succeeded", 42)
    return sessions


def test_one_row_per_study_version_newest_first_each_with_its_own_state_cost_and_sr(
    versions: sessionmaker[Session],
) -> None:
    with versions() as session:
        rows = version_page(session, limit=50)
        assert count_versions(session) == len(EXPECTED)
    assert {(r["study_instance_uid"], r["version"]): r["state"] for r in rows} == EXPECTED
    assert [r["at"] for r in rows] == sorted((r["at"] for r in rows), reverse=True)
    assert [(r["study_instance_uid"], r["version"]) for r in rows[:3]] == [("1.2", 2), ("1.6", 2), ("1.5", 2)]
    by_key = {(r["study_instance_uid"], r["version"]): r for r in rows}
    assert by_key[("1.1", 1)]["cost_usd"] == 0.01 and by_key[("1.1", 3)]["cost_usd"] == 0.02
    assert by_key[("1.1", 2)]["cost_usd"] is None  # never called the model
    assert by_key[("1.1", 1)]["sr_sop_instance_uid"] == "2.25.11"
    assert by_key[("1.1", 3)]["sr_sop_instance_uid"] == "2.25.13"
    assert by_key[("1.1", 1)]["problems"] == ["pacs: refused"]
    assert by_key[("1.1", 3)]["attempts"] == 3 and by_key[("1.2", 2)]["attempts"] == 0
    assert by_key[("1.1", 3)]["current"] and not by_key[("1.1", 1)]["current"]


@pytest.mark.parametrize("state", VERSION_STATES)
def test_the_state_filter_finds_exactly_the_versions_the_page_shows_in_that_state(
    versions: sessionmaker[Session], state: str
) -> None:
    """The filter works the state out in SQL, the page's rows in Python: they must agree."""
    with versions() as session:
        found = version_page(session, StudyFilter(state=state), limit=50)
        assert count_versions(session, StudyFilter(state=state)) == len(found)
    assert {(r["study_instance_uid"], r["version"]) for r in found} == {
        key for key, shown in EXPECTED.items() if shown == state
    }
    assert all(r["state"] == state for r in found)


def test_paging_and_filters_on_versions(versions: sessionmaker[Session]) -> None:
    with versions() as session:
        first = version_page(session, limit=5)
        second = version_page(session, limit=5, offset=5)
        everything = version_page(session, limit=50)
        assert first + second == everything[:10]
        assert {r["version"] for r in version_page(session, StudyFilter(uid="1.1"), limit=50)} == {1, 2, 3}
        day = StudyFilter(received_from=at(0), received_before=at(14))  # the versions' own times
        assert {(r["study_instance_uid"], r["version"]) for r in version_page(session, day)} == {
            ("1.1", 1),
            ("1.2", 1),
        }


def test_a_page_of_versions_costs_the_same_queries_for_2_rows_as_for_12(
    versions: sessionmaker[Session], counted: list[str]
) -> None:
    with versions() as session:
        counted.clear()
        assert len(version_page(session, limit=2)) == 2
        few = len(counted)
        counted.clear()
        assert len(version_page(session, limit=50)) == len(EXPECTED)
        assert len(counted) == few == 6  # versions, studies, jobs, costs, deliveries, modalities


def test_each_delivery_attempt_is_recorded_when_it_ends(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as s:
        _study(s, "1.9", 1, "sending", 0)
        outbox.enqueue(s, "1.9", 1, "sr/1.9/2.25.9.x.dcm", "2.25.9", ["pacs", "archive"], at(1))
    outcomes = [("pacs", "retry"), ("archive", "dead"), ("pacs", "sent")]
    for minute, (destination, outcome) in enumerate(outcomes, start=2):
        with transaction(sessions) as s:
            delivery = outbox.claim(s, destination, 60, at(minute))
            assert delivery is not None
            later = at(minute) + dt.timedelta(seconds=2)
            if outcome == "retry":
                outbox.mark_retry(s, delivery, "out of resources (0xA700)", 0xA700, later, delay_seconds=0)
            elif outcome == "dead":
                outbox.mark_dead(s, delivery, "C-STORE refused with 0xC000", 0xC000, later)
            else:
                outbox.mark_sent(s, delivery, 0, later)
    with sessions() as s:
        attempts = list(s.scalars(select(DeliveryAttempt).order_by(DeliveryAttempt.id)))
        detail = study_detail(s, "1.9")
    assert [(a.destination, a.attempt, a.outcome, a.status, a.error) for a in attempts] == [
        ("pacs", 1, "retry", 0xA700, "out of resources (0xA700)"),
        ("archive", 1, "dead", 0xC000, "C-STORE refused with 0xC000"),
        ("pacs", 2, "sent", 0, None),
    ]
    assert all(
        a.started_at is not None and (a.ended_at - a.started_at).total_seconds() == 2 for a in attempts
    )
    assert detail is not None
    events, hidden = detail.timeline()
    said = [e["what"] for e in events if "delivery to" in e["what"]]
    assert said == ["delivery to pacs: retry", "delivery to archive: dead", "delivery to pacs: sent"]
    assert hidden == 0
    assert any("attempt 1, status 0xA700, 2000 ms; out of resources" in e["detail"] for e in events)


def test_an_attempt_cut_short_by_the_death_of_its_sender_is_recorded_as_interrupted(
    sessions: sessionmaker[Session],
) -> None:
    with transaction(sessions) as s:
        _study(s, "1.8", 1, "sending", 0)
        outbox.enqueue(s, "1.8", 1, "sr/1.8/2.25.8.x.dcm", "2.25.8", ["pacs"], at(1))
        assert outbox.claim(s, "pacs", 60, at(2), owner="ward:4242") is not None
    with transaction(sessions) as s:
        assert outbox.reclaim_orphans(s, "ward", lambda pid: False, at(3)) == 1
    with sessions() as s:
        (attempt,) = s.scalars(select(DeliveryAttempt))
    assert (attempt.outcome, attempt.attempt, attempt.started_at, attempt.ended_at) == (
        "interrupted",
        1,
        at(2),
        at(3),
    )


def test_the_study_page_of_a_study_with_thousands_of_versions_reads_and_shows_a_bounded_part(
    sessions: sessionmaker[Session],
) -> None:
    from storage.overview import DETAIL_LIMIT, TIMELINE_LIMIT

    with transaction(sessions) as s:
        _study(s, "1.7", 2500, "done", 2500)
        s.execute(
            insert(Job),
            [
                {
                    "kind": "analyse",
                    "study_instance_uid": "1.7",
                    "study_version": v,
                    "state": "succeeded",
                    "attempts": 1,
                    "run_after": at(v),
                    "created_at": at(v),
                    "updated_at": at(v),
                }
                for v in range(1, 2501)
            ],
        )
        s.execute(
            insert(Outbox),
            [
                {
                    "study_instance_uid": "1.7",
                    "study_version": v,
                    "destination": "pacs",
                    "sr_path": f"sr/1.7/2.25.7.{v}.x.dcm",
                    "sr_sop_instance_uid": f"2.25.7.{v}",
                    "state": "sent",
                    "attempts": 1,
                    "next_attempt_at": at(v),
                    "created_at": at(v),
                    "updated_at": at(v),
                }
                for v in range(1, 2501)
            ],
        )
    with sessions() as s:
        detail = study_detail(s, "1.7")
        rows = version_page(s, StudyFilter(uid="1.7"), limit=50)
        assert count_versions(s, StudyFilter(uid="1.7")) == 2500
    assert detail is not None and detail.truncated
    assert len(detail.jobs) == DETAIL_LIMIT and detail.jobs[-1].study_version == 2500
    events, hidden = detail.timeline()
    assert len(events) == TIMELINE_LIMIT and hidden > 0
    assert [r["version"] for r in rows] == list(range(2500, 2450, -1))


def test_each_claim_of_an_analysis_is_recorded_with_its_worker(sessions: sessionmaker[Session]) -> None:
    from storage import queue
    from storage.models import JobClaim

    with transaction(sessions) as s:
        _study(s, "1.5", 1, "queued", 0)
        _job(s, "1.5", 1, "queued", 0, attempts=0)
    for minute, owner in ((1, "ward:11:a"), (2, "ward:12:b")):
        with transaction(sessions) as s:
            job = queue.claim(s, "analyse", owner, 60, at(minute))
            assert job is not None
            queue.release(s, job, at(minute))
    with sessions() as s:
        claims = [
            (c.attempt, c.owner, c.claimed_at) for c in s.scalars(select(JobClaim).order_by(JobClaim.id))
        ]
        detail = study_detail(s, "1.5")
    assert claims == [(1, "ward:11:a", at(1)), (1, "ward:12:b", at(2))]  # a release spends no attempt
    assert detail is not None
    said = [e["detail"] for e in detail.timeline()[0] if e["what"] == "version 1 claimed by a worker"]
    assert said == ["attempt 1, by ward:11:a", "attempt 1, by ward:12:b"]
