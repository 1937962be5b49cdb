"""Crash and scale-out: kill -9 in the middle of an analysis; two worker processes on one
PostgreSQL queue."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import create_engine, func, select

from storage.models import ApiCall, Job
from tests.data.generate import write_series
from tests.integration.loop import node_with_orthanc, push_from_orthanc, sr_in_orthanc
from tests.nodes import NodeFactory, dcmtk, orthanc, simulator, stop_process


def test_kill_9_during_analysis_still_ends_in_exactly_one_sr(make_node: NodeFactory, tmp_path: Path) -> None:
    study = generate_uid()
    files = write_series(tmp_path / "ct", 10, study_instance_uid=study)
    record = tmp_path / "requests.jsonl"
    with (
        simulator(tmp_path, "--latency-ms", "4000", "--record", str(record)) as url,
        orthanc(tmp_path) as ports,
    ):
        node = node_with_orthanc(make_node, url, ports, worker={"lease_seconds": 3})
        push_from_orthanc(ports["http_port"], files)
        deadline = time.monotonic() + 30
        while not (record.exists() and record.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        node.kill9()  # the model call is in flight; nothing of it is committed
        assert node.status()[0]["state"] == "analysing"
        node.start()
        row = node.wait_for_state(study, "done", timeout=40)
        time.sleep(1)
        assert len(sr_in_orthanc(ports["http_port"], study)) == 1
    assert len(record.read_text().splitlines()) == 2  # the uncommitted call was repeated, once
    engine = create_engine(node.database_url)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(ApiCall)) == 1  # only the committed one
        assert conn.scalar(select(Job.attempts)) == 2
    engine.dispose()
    assert row["sr_sop_instance_uid"]


def test_two_worker_processes_share_one_postgresql_queue_without_double_work(
    make_node: NodeFactory, tmp_path: Path, postgres_url: str
) -> None:
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--latency-ms", "300", "--record", str(record)) as url:
        node = make_node(
            storage={"database_url": postgres_url},
            vision={"provider": "simulator", "base_url": url},
            worker={"poll_seconds": 0.1, "concurrency": 1},
        ).start("scp")
        workers = [
            subprocess.Popen(
                [sys.executable, "-m", "scp.cli", "-c", str(node.config), "worker"],
                cwd=node.workdir,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for _ in range(2)
        ]
        try:
            studies = [generate_uid() for _ in range(8)]
            for n, study in enumerate(studies):
                files = write_series(tmp_path / f"s{n}", 2, study_instance_uid=study)
                sent = dcmtk("storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files))
                assert sent.returncode == 0
            for study in studies:
                node.wait_for_state(study, "done", timeout=60)
        finally:
            for worker in workers:
                stop_process(worker)
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        jobs = conn.execute(select(Job.study_instance_uid, Job.attempts, Job.lease_owner)).all()
        calls = conn.execute(select(ApiCall.study_instance_uid)).scalars().all()
    engine.dispose()
    assert sorted(j.study_instance_uid for j in jobs) == sorted(studies)
    assert all(j.attempts == 1 for j in jobs)
    assert sorted(calls) == sorted(studies)  # one model call per study, no more
    assert len(record.read_text().splitlines()) == 8
    assert len({j.lease_owner for j in jobs}) == 2  # both processes took work
