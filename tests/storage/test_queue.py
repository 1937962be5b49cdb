"""The study queue on SQLite and on PostgreSQL: settle, claim, lease, heartbeat, fail, reap."""

from __future__ import annotations

import datetime as dt
import os
import threading
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from conf.routing import Route
from storage import queue
from storage.db import make_engine, make_session_factory, migrate, transaction
from storage.errors import LeaseLost
from storage.models import Job, JobKind, JobState, Study, StudyState
from storage.owners import host_of, process_alive, this_process
from storage.studies import (
    HeaderIndex,
    IngestOutcome,
    ReceivedInstance,
    complete_study,
    extend_settle,
    instance_set,
    record_instance,
    requeue_study,
    settle_due,
)

T0 = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
SETTLE = 10.0


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def instance(
    sop: str, study: str = "1.2.3", series: str = "1.2.3.1", sha: str = "a" * 64
) -> ReceivedInstance:
    return ReceivedInstance(
        sop_instance_uid=sop,
        study_instance_uid=study,
        series_instance_uid=series,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"instances/{study}/{series}/{sop}.{sha[:16]}.dcm",
        size=100,
        sha256=sha,
        calling_ae_title="MODALITY",
    )


def receive(sessions: sessionmaker[Session], item: ReceivedInstance, now: dt.datetime) -> IngestOutcome:
    with transaction(sessions) as session:
        return record_instance(session, item, SETTLE, now).outcome


def settle(sessions: sessionmaker[Session], now: dt.datetime) -> list[str]:
    with transaction(sessions) as session:
        return settle_due(session, now)


def study(sessions: sessionmaker[Session], uid: str = "1.2.3") -> Study:
    with sessions() as session:
        return session.get_one(Study, uid)


def jobs(sessions: sessionmaker[Session]) -> list[Job]:
    with sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def claim(
    sessions: sessionmaker[Session], owner: str, now: dt.datetime, lease: float = 60
) -> queue.ClaimedJob | None:
    with transaction(sessions) as session:
        return queue.claim(session, JobKind.ANALYSE, owner, lease, now)


def test_instances_group_into_a_study_that_settles_into_exactly_one_job(
    sessions: sessionmaker[Session],
) -> None:
    assert receive(sessions, instance("1.1"), at(0)) is IngestOutcome.STORED
    assert receive(sessions, instance("1.2", series="1.2.3.2"), at(5)) is IngestOutcome.STORED
    assert settle(sessions, at(14)) == []  # 9 s after the last instance: not yet
    assert settle(sessions, at(15)) == ["1.2.3"]
    assert settle(sessions, at(30)) == []  # settling again queues nothing more
    s = study(sessions)
    assert (s.state, s.instance_count, s.series_count, s.version) == (StudyState.QUEUED, 2, 2, 1)
    assert [(j.state, j.study_version) for j in jobs(sessions)] == [(JobState.QUEUED, 1)]


def test_same_bytes_again_is_a_no_op_and_different_bytes_replace(sessions: sessionmaker[Session]) -> None:
    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(20))
    assert receive(sessions, instance("1.1"), at(21)) is IngestOutcome.DUPLICATE
    assert study(sessions).state == StudyState.QUEUED  # untouched
    with transaction(sessions) as session:
        result = record_instance(session, instance("1.1", sha="b" * 64), SETTLE, at(22))
    assert result.outcome is IngestOutcome.REPLACED
    assert result.superseded_path == instance("1.1").path
    s = study(sessions)
    assert (s.state, s.instance_count, s.version) == (StudyState.RECEIVING, 1, 1)


def test_late_instance_before_claim_pushes_the_job_back_without_a_second_job(
    sessions: sessionmaker[Session],
) -> None:
    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(10))
    receive(sessions, instance("1.2"), at(11))
    assert study(sessions).state == StudyState.RECEIVING
    assert claim(sessions, "w1", at(12)) is None  # pushed back to 21 s
    assert settle(sessions, at(21)) == ["1.2.3"]
    job = claim(sessions, "w1", at(21))
    assert job is not None and job.study_version == 1
    assert len(jobs(sessions)) == 1


def test_late_instance_after_analysis_began_reopens_a_new_version(sessions: sessionmaker[Session]) -> None:
    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(10))
    job = claim(sessions, "w1", at(10))
    assert job is not None and study(sessions).state == StudyState.ANALYSING
    receive(sessions, instance("1.2"), at(11))
    s = study(sessions)
    assert (s.state, s.version) == (StudyState.RECEIVING, 2)
    settle(sessions, at(21))
    assert [(j.study_version, j.state) for j in jobs(sessions)] == [
        (1, JobState.RUNNING),
        (2, JobState.QUEUED),
    ]
    with transaction(sessions) as session:  # the old version's job finishing leaves v2 alone
        queue.complete(session, job, at(22))
    assert study(sessions).state == StudyState.QUEUED


def test_open_association_holds_the_study_back(sessions: sessionmaker[Session]) -> None:
    receive(sessions, instance("1.1"), at(0))
    with transaction(sessions) as session:
        assert extend_settle(session, ["1.2.3"], at(25)) == 1
    assert settle(sessions, at(20)) == []
    assert settle(sessions, at(25)) == ["1.2.3"]


def test_a_restart_gives_every_receiving_study_a_new_settle_window(
    sessions: sessionmaker[Session],
) -> None:
    """The node died mid-study at 0 and restarts at 30: the modality will send the rest again,
    so the instances that made it do not settle as a version of their own at once."""
    receive(sessions, instance("1.1"), at(0))
    receive(sessions, instance("2.1", study="2.3", series="2.3.1"), at(0))
    settle(sessions, at(10))  # 1.2.3 and 2.3 queued: no longer receiving
    receive(sessions, instance("3.1", study="3.3", series="3.3.1"), at(0))
    with transaction(sessions) as session:
        assert extend_settle(session, None, at(30 + SETTLE)) == 1
    assert settle(sessions, at(30)) == []
    assert settle(sessions, at(30 + SETTLE)) == ["3.3"]


def test_claim_leases_heartbeats_and_completes(sessions: sessionmaker[Session]) -> None:
    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(10))
    job = claim(sessions, "w1", at(10), lease=30)
    assert job is not None and job.attempts == 1
    assert claim(sessions, "w2", at(11)) is None
    with transaction(sessions) as session:
        job = queue.heartbeat(session, job, 30, at(35))
    with transaction(sessions) as session:
        assert queue.reap_expired(session, at(50)) == []  # heartbeat moved the lease to 65 s
    with transaction(sessions) as session:
        queue.complete(session, job, at(51))
    assert jobs(sessions)[0].state == JobState.SUCCEEDED


def test_stale_worker_loses_its_lease_to_the_reaper(sessions: sessionmaker[Session]) -> None:
    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(10))
    stale = claim(sessions, "w1", at(10), lease=30)
    assert stale is not None
    with transaction(sessions) as session:
        assert queue.reap_expired(session, at(41)) == [stale.id]
    assert study(sessions).state == StudyState.QUEUED
    fresh = claim(sessions, "w2", at(41))
    assert fresh is not None and fresh.id == stale.id and fresh.attempts == 2
    for action in (
        lambda s: queue.heartbeat(s, stale, 30, at(42)),
        lambda s: queue.complete(s, stale, at(42)),
        lambda s: queue.fail(s, stale, "late", at(42)),
    ):
        with pytest.raises(LeaseLost, match=f"job {stale.id}"), transaction(sessions) as session:
            action(session)
    with transaction(sessions) as session:
        queue.complete(session, fresh, at(43))
    assert jobs(sessions)[0].state == JobState.SUCCEEDED


def test_failures_back_off_then_fail_for_good(sessions: sessionmaker[Session]) -> None:
    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(10))
    now = 10.0
    for attempt in range(1, 6):
        job = claim(sessions, "w1", at(now))
        assert job is not None and job.attempts == attempt
        with transaction(sessions) as session:
            state = queue.fail(session, job, f"API said 500 (attempt {attempt})", at(now))
        if attempt < 5:
            assert state is JobState.QUEUED
            delay = queue.backoff_seconds(attempt)
            assert claim(sessions, "w1", at(now + delay - 1)) is None
            now += delay
    assert state is JobState.FAILED
    s = study(sessions)
    assert s.state == StudyState.FAILED and s.last_error == "API said 500 (attempt 5)"


def test_non_retryable_failure_fails_at_once(sessions: sessionmaker[Session]) -> None:
    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(10))
    job = claim(sessions, "w1", at(10))
    assert job is not None
    with transaction(sessions) as session:
        assert queue.fail(session, job, "401 invalid API key", at(11), retryable=False) is JobState.FAILED


def test_release_returns_the_job_without_counting_the_attempt(sessions: sessionmaker[Session]) -> None:
    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(10))
    job = claim(sessions, "w1", at(10))
    assert job is not None
    with transaction(sessions) as session:
        queue.release(session, job, at(11))
    again = claim(sessions, "w2", at(11))
    assert again is not None and again.attempts == 1


def test_concurrent_workers_never_claim_the_same_job(sessions: sessionmaker[Session]) -> None:
    for n in range(40):
        receive(sessions, instance(f"1.{n}", study=f"2.{n}"), at(0))
    assert len(settle(sessions, at(10))) == 40
    claimed: dict[str, list[int]] = {"a": [], "b": [], "c": [], "d": []}
    start = threading.Barrier(len(claimed))

    def work(owner: str) -> None:
        start.wait()
        while (job := claim(sessions, owner, at(10))) is not None:
            claimed[owner].append(job.id)

    threads = [threading.Thread(target=work, args=(owner,)) for owner in claimed]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    everything = [job_id for ids in claimed.values() for job_id in ids]
    assert len(everything) == 40 and len(set(everything)) == 40
    with sessions() as session:
        assert session.scalar(select(func.count()).where(Job.state == JobState.RUNNING)) == 40


def test_backoff_rejects_a_zero_attempt_count() -> None:
    with pytest.raises(ValueError, match='"attempts" must be at least 1, got 0'):
        queue.backoff_seconds(0)


def test_routes_set_priority_and_skip_what_they_do_not_want(sessions: sessionmaker[Session]) -> None:
    from dataclasses import replace as with_

    from conf.routing import Route

    routes = (
        Route(name="stat", modalities=("CT",), calling_aets=("ER_CT",), priority=10),
        Route(name="skip-us", modalities=("US",), action="skip"),
        Route(name="ct", modalities=("CT",)),
    )
    base = instance("1.1", study="5.1")
    receive(sessions, with_(base, calling_ae_title="CT01", header=HeaderIndex(modality="CT")), at(0))
    receive(
        sessions,
        with_(instance("1.2", study="5.2"), calling_ae_title="ER_CT", header=HeaderIndex(modality="CT")),
        at(1),
    )
    receive(sessions, with_(instance("1.3", study="5.3"), header=HeaderIndex(modality="US")), at(0))
    receive(sessions, with_(instance("1.4", study="5.4"), header=HeaderIndex(modality="MG")), at(0))
    with transaction(sessions) as session:
        assert sorted(settle_due(session, at(20), routes=routes)) == ["5.1", "5.2"]
    first = claim(sessions, "w", at(20))
    assert first is not None and first.study_instance_uid == "5.2"  # STAT first, though it came later
    assert study(sessions, "5.3").state == StudyState.SKIPPED
    assert study(sessions, "5.3").last_error == 'not analysed: route "skip-us" skips it'
    assert study(sessions, "5.4").last_error == "not analysed: no routing rule matched"
    assert {j.study_instance_uid: j.route for j in jobs(sessions)} == {"5.1": "ct", "5.2": "stat"}


def test_our_own_sr_sent_back_by_the_pacs_does_not_reopen_the_study(sessions: sessionmaker[Session]) -> None:
    from storage import outbox

    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(10))
    job = claim(sessions, "w", at(10))
    assert job is not None
    with transaction(sessions) as session:
        outbox.enqueue(session, "1.2.3", 1, "sr/1.2.3/9.9.dcm", "9.9", ["pacs"], at(11))
        queue.complete(session, job, at(11))
    own = instance("9.9", series="9.8", sha="c" * 64)
    assert receive(sessions, own, at(12)) is IngestOutcome.OWN_OUTPUT
    s = study(sessions)
    assert (s.state, s.version, s.instance_count) == (StudyState.SENDING, 1, 1)


def test_a_study_receiving_a_late_series_is_not_claimed_until_it_settles_again(
    sessions: sessionmaker[Session],
) -> None:
    """The review's case 1: a second series sent in its own association right after the first
    settled must not be analysed half-received."""
    receive(sessions, instance("1.1"), at(0))
    assert settle(sessions, at(SETTLE)) == ["1.2.3"]
    receive(sessions, instance("2.1", series="1.2.3.2"), at(SETTLE + 1))  # the job is pushed back
    receive(sessions, instance("2.2", series="1.2.3.2"), at(SETTLE + 9))  # ... but only once
    assert study(sessions).state == StudyState.RECEIVING
    assert claim(sessions, "w1", at(SETTLE + 12)) is None  # the job is due; the study is not settled
    assert settle(sessions, at(SETTLE + 9 + SETTLE)) == ["1.2.3"]
    job = claim(sessions, "w1", at(SETTLE + 9 + SETTLE))
    assert job is not None and job.study_version == 1
    assert study(sessions).state == StudyState.ANALYSING


def test_a_superseded_version_is_cancelled_not_run(sessions: sessionmaker[Session]) -> None:
    """The review's case 2: version 1's job requeued after version 2 opened must not run."""
    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(SETTLE))
    first = claim(sessions, "w1", at(SETTLE))
    assert first is not None
    receive(sessions, instance("1.2"), at(SETTLE + 1))  # during the analysis: version 2
    with transaction(sessions) as session:
        queue.fail(session, first, "HTTP 503", at(SETTLE + 2), retry_in_seconds=0)  # version 1 requeued
    settle(sessions, at(2 * SETTLE + 1))
    second = claim(sessions, "w2", at(2 * SETTLE + 2))
    assert second is not None and second.study_version == 2
    assert claim(sessions, "w3", at(2 * SETTLE + 3)) is None
    states = {(j.study_version, j.state, j.last_error) for j in jobs(sessions)}
    assert (1, JobState.CANCELLED, "superseded: a newer version of the study was opened") in states


def test_postponing_keeps_the_cause_and_spends_no_attempt(sessions: sessionmaker[Session]) -> None:
    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(SETTLE))
    job = claim(sessions, "w1", at(SETTLE))
    assert job is not None and job.attempts == 1
    with transaction(sessions) as session:
        queue.postpone(session, job, at(SETTLE + 60), "provider down: HTTP 503 (circuit open)", at(SETTLE))
    (row,) = jobs(sessions)
    assert (row.state, row.attempts, row.last_error) == (
        JobState.QUEUED,
        0,
        "provider down: HTTP 503 (circuit open)",
    )
    assert study(sessions).last_error == "provider down: HTTP 503 (circuit open)"
    assert claim(sessions, "w1", at(SETTLE + 59)) is None
    assert claim(sessions, "w1", at(SETTLE + 60)) is not None


def test_findings_committed_by_one_attempt_are_there_for_the_next(sessions: sessionmaker[Session]) -> None:
    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(SETTLE))
    job = claim(sessions, "w1", at(SETTLE), lease=5)
    assert job is not None
    with transaction(sessions) as session:
        queue.store_findings(session, job, '{"summary": "x"}', at(SETTLE + 1))
    with transaction(sessions) as session:
        assert queue.reap_expired(session, at(SETTLE + 10)) == [job.id]  # the worker died after
    again = claim(sessions, "w2", at(SETTLE + 11))
    assert again is not None and again.id == job.id
    with sessions() as session:
        assert queue.stored_findings(session, again) == '{"summary": "x"}'
    with pytest.raises(LeaseLost), transaction(sessions) as session:
        queue.store_findings(session, job, '{"summary": "stale"}', at(SETTLE + 12))  # the old lease


def test_a_restarted_node_reclaims_at_once_what_its_dead_process_held(
    sessions: sessionmaker[Session],
) -> None:
    for n, owner in enumerate(["ward-host:4242", "ward-host:5353", "other-host:4242"]):
        receive(sessions, instance(f"1.{n}", study=f"1.2.{n}"), at(0))
        settle(sessions, at(SETTLE))
        assert claim(sessions, owner, at(SETTLE), lease=60) is not None
    with transaction(sessions) as session:
        reclaimed = queue.reclaim_orphans(session, "ward-host", lambda pid: pid == 5353, at(SETTLE + 1))
    rows = {j.lease_owner or j.state: j for j in jobs(sessions)}
    assert len(reclaimed) == 1  # 4242 on this host is gone; 5353 is alive; the other host is not ours
    assert rows["ward-host:5353"].state == rows["other-host:4242"].state == JobState.RUNNING
    requeued = next(j for j in jobs(sessions) if j.id == reclaimed[0])
    assert (requeued.state, requeued.run_after) == (JobState.QUEUED, at(SETTLE + 1))
    assert requeued.last_error == "its worker process on this host is gone"


def test_a_restart_that_gets_the_same_pid_still_reclaims_what_the_killed_process_held(
    sessions: sessionmaker[Session],
) -> None:
    """In a container the node is PID 1 at every restart: "is PID 1 alive?" is yes (it is us)
    for the leases the killed incarnation left. Only this incarnation's own leases are live."""
    me = this_process()
    host, pid = host_of(me), os.getpid()
    owners = [f"{host}:{pid}", f"{host}:{pid}:0123456789ab", me]  # before incarnations, an earlier one, us
    for n, owner in enumerate(owners):
        receive(sessions, instance(f"1.{n}", study=f"1.2.{n}"), at(0))
        settle(sessions, at(SETTLE))
        assert claim(sessions, owner, at(SETTLE), lease=60) is not None
    with transaction(sessions) as session:
        reclaimed = queue.reclaim_orphans(session, host, process_alive, at(SETTLE + 1))
    assert len(reclaimed) == 2
    assert [j.state for j in jobs(sessions) if j.lease_owner == me] == [JobState.RUNNING]


def test_on_sqlite_a_long_read_does_not_hold_up_a_write(tmp_path: Path) -> None:
    """Status pages, metrics and pixel preparation read for a long time; C-STORE commits must
    not wait behind them (readers take no write lock)."""
    engine = make_engine(f"sqlite:///{tmp_path}/node.db")
    migrate(engine)
    factory = make_session_factory(engine)
    receive(factory, instance("1.1"), at(0))
    written = threading.Event()

    def write() -> None:
        receive(factory, instance("1.2"), at(1))
        written.set()

    try:
        with factory() as reader:
            assert reader.scalar(select(func.count()).select_from(Study)) == 1  # the read is open
            writer = threading.Thread(target=write)
            writer.start()
            assert written.wait(10), "the write waited for the reader"
            writer.join()
            assert reader.scalar(select(func.count()).select_from(Job)) == 0  # still reading
    finally:
        engine.dispose()


def test_complete_queues_a_receiving_study_now_through_the_routes(sessions: sessionmaker[Session]) -> None:
    routes = [Route(name="stat", calling_aets=("MODALITY",), priority=10)]
    receive(sessions, instance("1.1"), at(0))
    receive(sessions, instance("9.1", study="9.9.9"), at(0))  # another study, also receiving
    with transaction(sessions) as session:
        assert complete_study(session, "1.2.3", at(1), routes) == StudyState.QUEUED
    (job,) = jobs(sessions)
    assert (job.study_instance_uid, job.route, job.priority, job.run_after) == ("1.2.3", "stat", 10, at(1))
    assert study(sessions, "9.9.9").state == StudyState.RECEIVING  # only the one named
    with transaction(sessions) as session:
        assert complete_study(session, "1.2.3", at(2), routes) == StudyState.QUEUED  # nothing to do
    with pytest.raises(LookupError, match=r"no study 4\.5\.6"), transaction(sessions) as session:
        complete_study(session, "4.5.6", at(3), routes)


def test_retry_goes_through_the_routes_and_the_old_version_never_runs(
    sessions: sessionmaker[Session],
) -> None:
    routes = [Route(name="skip-modality", calling_aets=("MODALITY",), action="skip")]
    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(SETTLE))  # no routes here: queued
    with transaction(sessions) as session:
        assert requeue_study(session, "1.2.3", at(SETTLE + 1), routes) == 2
    assert study(sessions).state == StudyState.SKIPPED
    assert claim(sessions, "w1", at(SETTLE + 2)) is None  # version 1's job is cancelled, not run
    assert [(j.study_version, j.state) for j in jobs(sessions)] == [(1, JobState.CANCELLED)]


def test_each_version_keeps_the_instance_set_it_was_queued_with(sessions: sessionmaker[Session]) -> None:
    receive(sessions, instance("1.1"), at(0))
    receive(sessions, instance("1.2"), at(1))
    settle(sessions, at(1 + SETTLE))
    first = claim(sessions, "w1", at(1 + SETTLE))
    assert first is not None
    receive(sessions, instance("2.1", series="1.2.3.2"), at(12))  # during the analysis: version 2
    with sessions() as session:
        assert instance_set(session, "1.2.3", 1) == {"1.1", "1.2"}  # the late one is not in it
        assert instance_set(session, "1.2.3", 2) is None  # not fixed until version 2 settles
    settle(sessions, at(12 + SETTLE))
    with sessions() as session:
        assert instance_set(session, "1.2.3", 2) == {"1.1", "1.2", "2.1"}


def test_a_set_fixed_before_a_late_instance_is_fixed_again_when_it_resettles(
    sessions: sessionmaker[Session],
) -> None:
    receive(sessions, instance("1.1"), at(0))
    settle(sessions, at(SETTLE))
    receive(sessions, instance("1.2"), at(SETTLE + 1))  # before any claim: same version, reopened
    settle(sessions, at(2 * SETTLE + 1))
    with sessions() as session:
        assert instance_set(session, "1.2.3", 1) == {"1.1", "1.2"}
