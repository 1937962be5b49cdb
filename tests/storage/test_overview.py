"""The query layer behind ainode status and the console (storage.overview): a page of studies
costs a fixed number of queries, whatever its length, and reads never take the write lock."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from storage.actions import redeliver
from storage.db import transaction
from storage.models import ApiCall, Instance, Job, Outbox, Study, utc_now
from storage.overview import StudyFilter, count_versions, study_rows, version_page


def _fill(sessions: sessionmaker[Session], count: int) -> dt.datetime:
    now = utc_now()
    with transaction(sessions) as session:
        for n in range(count):
            uid = f"1.2.3.{n}"
            at = now - dt.timedelta(minutes=count - n)
            session.execute(
                insert(Study).values(
                    study_instance_uid=uid,
                    state="failed" if n % 10 == 0 else "done",
                    first_received_at=at,
                    last_received_at=at,
                    settle_at=at,
                    calling_ae_title="CT01" if n % 2 else "MR01",
                    instance_count=1,
                    series_count=1,
                )
            )
            session.execute(
                insert(Instance).values(
                    sop_instance_uid=f"{uid}.1",
                    study_instance_uid=uid,
                    series_instance_uid=f"{uid}.9",
                    sop_class_uid="1.2",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path="x",
                    size=1,
                    sha256="0" * 64,
                    calling_ae_title="CT01",
                    received_at=at,
                    modality="CT" if n % 2 else "MR",
                )
            )
            session.execute(
                insert(Job).values(
                    kind="analyse",
                    study_instance_uid=uid,
                    study_version=1,
                    state="succeeded",
                    attempts=1,
                    run_after=at,
                    created_at=at,
                    updated_at=at,
                )
            )
            session.execute(
                insert(ApiCall).values(
                    study_instance_uid=uid,
                    provider="openai",
                    model="m",
                    images=1,
                    prompt_tokens=1,
                    completion_tokens=1,
                    cost_usd=0.01,
                    latency_ms=5.0,
                    status=200,
                    called_at=at,
                )
            )
            session.execute(
                insert(Outbox).values(
                    study_instance_uid=uid,
                    study_version=1,
                    destination="pacs",
                    sr_path=f"sr/{uid}/a.dcm",
                    sr_sop_instance_uid=f"2.25.{n}",
                    state="dead" if n % 10 == 0 else "sent",
                    attempts=1,
                    next_attempt_at=at,
                    created_at=at,
                    updated_at=at,
                )
            )
    return now


def test_a_page_costs_the_same_queries_for_5_rows_as_for_50(
    sessions: sessionmaker[Session], counted: list[str]
) -> None:
    _fill(sessions, 60)
    with sessions() as session:
        counted.clear()
        small = version_page(session, limit=5)
        few = len(counted)
        counted.clear()
        big = version_page(session, limit=50)
        many = len(counted)
    assert len(small) == 5 and len(big) == 50
    assert few == many == 6  # versions, studies, jobs, costs, deliveries, modalities
    assert [r["study_instance_uid"] for r in small] == [
        f"1.2.3.{n}" for n in range(59, 54, -1)
    ]  # newest first
    first = big[0]
    assert (
        first["modalities"] == ["CT"]
        and first["cost_usd"] == 0.01
        and first["deliveries"][0]["state"] == "sent"
    )


def test_filters_and_search(sessions: sessionmaker[Session]) -> None:
    _fill(sessions, 30)
    with sessions() as session:
        assert count_versions(session) == 30
        assert count_versions(session, StudyFilter(state="failed")) == 3
        assert count_versions(session, StudyFilter(modality="CT")) == 15
        assert count_versions(session, StudyFilter(calling_ae_title="MR01", state="failed")) == 3
        assert [r["study_instance_uid"] for r in version_page(session, StudyFilter(uid="1.2.3.2"))][
            -1
        ] == "1.2.3.2"
        assert count_versions(session, StudyFilter(uid="1.2.3.2")) == 11  # 1.2.3.2 and 1.2.3.20-29
    with pytest.raises(ValueError, match='Argument "state" must be one of'):
        StudyFilter(state="lost")


def test_status_lists_every_study_and_redeliver_reopens_a_dead_delivery(
    sessions: sessionmaker[Session],
) -> None:
    now = _fill(sessions, 12)
    with sessions() as session:
        rows = study_rows(session)
    assert len(rows) == 12 and rows[0]["study_instance_uid"] == "1.2.3.0"  # oldest first
    assert rows[0]["deliveries"][0]["state"] == "dead"
    with transaction(sessions) as session:
        dead_id = session.query(Outbox.id).filter(Outbox.study_instance_uid == "1.2.3.0").scalar()
        assert redeliver(session, dead_id, now) == "1.2.3.0"
        assert redeliver(session, dead_id, now) is None  # not dead any more
    with sessions() as session:
        row = study_rows(session)[0]
    assert row["state"] == "sending" and row["deliveries"][0]["state"] == "pending"
