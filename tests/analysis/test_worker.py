"""The analysis worker in process, against ``ainode simulate-vision`` over HTTP and a real SQLite
queue: every failure ends in a recorded outcome, a committed answer is never paid for twice, an
outage postpones instead of failing, and a worker that lost its lease leaves no file behind."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from analysis.vision.client import VisionClient
from analysis.worker import AnalysisWorker
from conf import Settings, StorageSettings
from storage.db import open_database, transaction
from storage.files import InstanceStore
from storage.models import ApiCall, Job, JobState, Outbox, Study, StudyState
from storage.studies import settle_due
from tests.data.generate import write_series
from tests.data.ingest import ingest
from tests.nodes import simulator

T0 = dt.datetime(2030, 1, 1, 12, 0, tzinfo=dt.UTC)


class Clock:
    """The worker's clock, moved by the test (queue times only; HTTP and the breaker run on
    real time)."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@pytest.fixture
def study_node(tmp_path: Path) -> Iterator[tuple[Settings, Any, str]]:
    """A node's storage and SQLite database holding one settled 3-slice CT study."""
    root = tmp_path / "var"
    store = InstanceStore(root)
    store.prepare()
    url = f"sqlite:///{root}/ainode.db"
    study = ingest(write_series(tmp_path / "ct", 3, study_instance_uid=generate_uid()), store, url)
    settings = Settings(storage=StorageSettings(root=root, database_url=url))
    with open_database(url) as sessions:
        with transaction(sessions) as session:
            settle_due(session, T0)
        yield settings, sessions, study


WORKERS: list[AnalysisWorker] = []


@pytest.fixture(autouse=True)
def _stop_workers() -> Iterator[None]:
    yield
    while WORKERS:
        WORKERS.pop().stop()


def _worker(settings: Settings, sessions: Any, url: str, clock: Clock, **vision: Any) -> AnalysisWorker:
    values = {
        "provider": "simulator",
        "base_url": url,
        "max_retries": 0,
        "backoff_base_seconds": 0.01,
        "backoff_cap_seconds": 0.02,
        "requests_per_minute": 0,
        **vision,
    }
    configured = settings.model_copy(update={"vision": settings.vision.model_copy(update=values)})
    worker = AnalysisWorker(configured, sessions, VisionClient(configured.vision), clock=clock, settles=False)
    WORKERS.append(worker)
    return worker


def _job(sessions: Any) -> Job:
    with sessions() as session:
        job: Job = session.scalars(select(Job)).one()
        return job


def _requests(record: Path) -> int:
    return len(record.read_text().splitlines()) if record.exists() else 0


def test_a_failure_after_the_answer_is_recorded_and_the_retry_pays_nothing(
    study_node: tuple[Settings, Any, str], tmp_path: Path
) -> None:
    settings, sessions, study = study_node
    blocker = settings.storage.root / "sr" / study
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the SR folder must go")  # the SR cannot be written
    record = tmp_path / "requests.jsonl"
    clock = Clock()
    with simulator(tmp_path, "--record", str(record)) as url:
        worker = _worker(settings, sessions, url, clock)
        assert worker.run_once()
        job = _job(sessions)
        assert (job.state, job.attempts) == (JobState.QUEUED, 1)  # a disk error: retried, not lost
        assert job.last_error is not None and job.last_error.startswith(
            ("NotADirectoryError", "FileExistsError")
        )
        assert job.findings_json is not None and _requests(record) == 1
        with sessions() as session:
            assert [c.status for c in session.scalars(select(ApiCall))] == [200]
        blocker.unlink()
        clock.advance(3600)
        assert worker.run_once()
    with sessions() as session:
        assert session.get_one(Study, study).state == StudyState.DONE
        (sr_path,) = session.scalars(select(Outbox.sr_path)).all() or [None]
    assert _requests(record) == 1  # the committed answer was used, not bought again
    assert sr_path is None  # no destinations configured: done once written
    (written,) = (settings.storage.root / "sr" / study).glob("*.dcm")
    assert dcmread(written).StudyInstanceUID == study


def test_a_provider_outage_postpones_the_study_and_it_finishes_when_the_provider_is_back(
    study_node: tuple[Settings, Any, str], tmp_path: Path
) -> None:
    settings, sessions, study = study_node
    record = tmp_path / "requests.jsonl"
    clock = Clock()
    with simulator(tmp_path, "--fail-500", "5", "--record", str(record)) as url:
        worker = _worker(
            settings,
            sessions,
            url,
            clock,
            max_retries=2,
            circuit_failure_threshold=2,
            circuit_cooldown_seconds=0.3,
        )
        outcomes: list[tuple[str, int, str | None]] = []
        for _ in range(12):
            worker.run_once()
            job = _job(sessions)
            outcomes.append((job.state, job.attempts, job.last_error))
            if job.state == JobState.SUCCEEDED:
                break
            time.sleep(0.35)  # the breaker's cool-down runs on real time
            clock.advance(1)
    assert outcomes[-1][0] == JobState.SUCCEEDED
    assert all(state != JobState.FAILED for state, _, _ in outcomes)
    assert max(attempts for _, attempts, _ in outcomes) <= 1  # the outage spent no attempt
    postponed = [error for _, _, error in outcomes if error and "circuit open" in error]
    assert postponed and all("simulator is failing (HTTP 500" in error for error in postponed)
    with sessions() as session:
        assert session.get_one(Study, study).state == StudyState.DONE
    assert _requests(record) == 6  # five 500s, then the answer


def test_a_worker_that_lost_its_lease_leaves_the_winners_sr_alone(
    study_node: tuple[Settings, Any, str], tmp_path: Path
) -> None:
    settings, sessions, study = study_node
    record = tmp_path / "requests.jsonl"
    slow, late = Clock(), Clock()
    late.advance(3600)  # the second worker lives an hour later: the first one's lease has lapsed
    with simulator(tmp_path, "--latency-ms", "1500", "--record", str(record)) as url:
        first = _worker(settings, sessions, url, slow)
        first.settings = first.settings.model_copy(
            update={"worker": first.settings.worker.model_copy(update={"lease_seconds": 0.6})}
        )
        runner = threading.Thread(target=first.run_once)
        runner.start()
        deadline = time.monotonic() + 10
        while _requests(record) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        second = _worker(settings, sessions, url, late)
        second.settles = True  # reaps the lapsed lease, then claims
        assert second.run_once()
        runner.join(20)
    assert not runner.is_alive()
    job = _job(sessions)
    assert job.state == JobState.SUCCEEDED
    files = sorted((settings.storage.root / "sr" / study).glob("*.dcm"))
    with sessions() as session:
        assert session.get_one(Study, study).state == StudyState.DONE
    assert len(files) == 1  # the loser wrote nothing (its guarded store of findings failed)
    assert json.loads(job.findings_json or "{}")["summary"].startswith("SIMULATED")


def test_a_database_error_outside_a_transaction_is_retried_not_a_failed_study(
    study_node: tuple[Settings, Any, str], tmp_path: Path
) -> None:
    """The worker's reads (instance set, pixels, headers) run in plain sessions, where a
    dropped PostgreSQL connection surfaces as SQLAlchemy's OperationalError, not as
    DatabaseUnavailable: database trouble is retried, it does not fail the study for good."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import OperationalError

    from storage import queue

    settings, sessions, _study = study_node
    gone = create_engine(f"sqlite:///{tmp_path}/no/such/folder/x.db")
    with pytest.raises(OperationalError) as raised, gone.connect() as connection:
        connection.execute(text("SELECT 1"))
    gone.dispose()
    with simulator(tmp_path) as url:
        worker = _worker(settings, sessions, url, Clock())
        with transaction(sessions) as session:
            job = queue.claim(session, "analyse", worker.owner, 60, T0)
        assert job is not None
        worker._record_failure({"job": job}, raised.value)
    row = _job(sessions)
    assert (row.state, row.attempts) == (JobState.QUEUED, 1)
    assert row.last_error is not None and row.last_error.startswith("OperationalError")


def test_a_head_ct_is_offered_only_the_head_list_and_its_sr_codes_from_it(
    study_node: tuple[Settings, Any, str], tmp_path: Path
) -> None:
    """The study is a CT without Body Part Examined whose header window is a brain window: a
    head CT. The request offers the head list only (hemorrhage, infarct; no pneumothorax), the
    simulator answers from the enum the request carries (its first code), and the SR codes that.
    Had the worker sent another list, the simulator would have answered another code."""
    settings, sessions, study = study_node
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--record", str(record)) as url:
        worker = _worker(settings, sessions, url, Clock())
        assert worker.run_once()
    (body,) = [json.loads(line) for line in record.read_text().splitlines()]
    schema = body["response_format"]["json_schema"]["schema"]
    offered = schema["properties"]["findings"]["items"]["properties"]["finding_code"]["anyOf"][0]["enum"]
    assert {"1386000", "55641003"} <= set(offered) and "36118008" not in offered
    assert offered[0] == "301766008"  # Lesion of brain: the head list's first
    with sessions() as session:
        assert session.get_one(Study, study).state == StudyState.DONE
    (written,) = (settings.storage.root / "sr" / study).glob("*.dcm")
    finding_types = [
        (str(code.CodingSchemeDesignator), str(code.CodeValue))
        for group in dcmread(written).ContentSequence
        for container in group.get("ContentSequence", [])
        for item in container.get("ContentSequence", [])
        if item.ConceptNameCodeSequence[0].CodeValue == "121071"  # Finding
        for code in item.ConceptCodeSequence
    ]
    assert finding_types and set(finding_types) == {("SCT", "301766008")}
