"""The console with 100,000 studies: how long each page takes to render (server side, over HTTP
on loopback), and ``ainode status``'s query layer over all of them.

    python -m benchmarks.console [--studies 100000] [--rounds 5]

Synthetic rows (a SQLite database made with the node's own migrations): per study two instances
(CT or MR or CR), one job, one model call and one delivery with its attempt (a few hundred
dead-lettered), spread over 60 days; one study in twenty was analysed twice (two versions), and
one study has 1,000 versions (a hostile case for the study page). The HTTP server is the
node's own (uvicorn, the same app as ``ainode serve``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import insert

from conf import Settings
from scp.web.server import WebServer
from storage.db import open_database, transaction
from storage.models import ApiCall, DeliveryAttempt, Instance, Job, Outbox, Study, utc_now
from storage.overview import study_rows

STATES = ["done"] * 90 + ["failed"] * 3 + ["sending"] * 3 + ["queued", "analysing", "receiving", "skipped"]
MODALITIES = ["CT", "CT", "MR", "CR"]
AES = ["CT01", "CT02", "MR01", "CR01", "PACS"]
BATCH = 5000


MANY_VERSIONS = 1000


def fill(database_url: str, count: int, seed: int = 7) -> tuple[str, str]:
    """Write ``count`` synthetic studies; returns one study UID (from the middle) to look up
    and the UID of the study with MANY_VERSIONS versions."""
    rng = random.Random(seed)
    now = utc_now()
    middle = many = ""
    job_id = outbox_id = 0
    with open_database(database_url) as sessions:
        for start in range(0, count, BATCH):
            studies: list[dict[str, Any]] = []
            instances: list[dict[str, Any]] = []
            jobs: list[dict[str, Any]] = []
            calls: list[dict[str, Any]] = []
            sends: list[dict[str, Any]] = []
            attempts: list[dict[str, Any]] = []
            for n in range(start, min(start + BATCH, count)):
                uid = f"1.2.826.0.1.3680043.10.{n}"
                at = now - dt.timedelta(seconds=rng.uniform(0, 60 * 86400))
                state = rng.choice(STATES)
                modality = rng.choice(MODALITIES)
                versions = MANY_VERSIONS if n == count // 3 else (2 if n % 20 == 0 else 1)
                if versions == MANY_VERSIONS:
                    many = uid
                studies.append(
                    {
                        "study_instance_uid": uid,
                        "state": state,
                        "version": versions,
                        "instance_count": 2,
                        "series_count": 1,
                        "first_received_at": at,
                        "last_received_at": at,
                        "settle_at": at,
                        "calling_ae_title": rng.choice(AES),
                        "sr_sop_instance_uid": f"2.25.{n}.{versions}" if state == "done" else None,
                        "last_error": "SR delivery failed: pacs: refused" if state == "failed" else None,
                    }
                )
                for i in range(2):
                    instances.append(
                        {
                            "sop_instance_uid": f"{uid}.{i}",
                            "study_instance_uid": uid,
                            "series_instance_uid": f"{uid}.100",
                            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
                            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                            "path": f"instances/{uid}/{i}.dcm",
                            "size": 525_000,
                            "sha256": "0" * 64,
                            "calling_ae_title": "CT01",
                            "received_at": at,
                            "modality": modality,
                            "body_part_examined": "CHEST",
                        }
                    )
                for version in range(1, versions + 1):
                    job_id += 1
                    outbox_id += 1
                    at_version = at + dt.timedelta(minutes=version - 1)
                    last = version == versions
                    if last and state in ("receiving", "skipped"):
                        continue  # not queued (yet): no job, no call, nothing to send
                    sent = (
                        ("dead" if state == "failed" else ("pending" if state == "sending" else "sent"))
                        if last
                        else "sent"
                    )
                    jobs.append(
                        {
                            "id": job_id,
                            "kind": "analyse",
                            "study_instance_uid": uid,
                            "study_version": version,
                            "state": "succeeded",
                            "attempts": 1,
                            "findings_json": "{}",
                            "run_after": at_version,
                            "created_at": at_version,
                            "updated_at": at_version,
                        }
                    )
                    calls.append(
                        {
                            "study_instance_uid": uid,
                            "job_id": job_id,
                            "provider": "openai",
                            "model": "gpt-4o",
                            "images": 3,
                            "prompt_tokens": 2400,
                            "completion_tokens": 300,
                            "cost_usd": 0.009,
                            "latency_ms": rng.uniform(800, 9000),
                            "status": 200,
                            "called_at": at_version,
                        }
                    )
                    sends.append(
                        {
                            "id": outbox_id,
                            "study_instance_uid": uid,
                            "study_version": version,
                            "destination": "pacs",
                            "sr_path": f"sr/{uid}/x{version}.dcm",
                            "sr_sop_instance_uid": f"2.25.{n}.{version}",
                            "state": sent,
                            "attempts": 1,
                            "next_attempt_at": at_version,
                            "created_at": at_version,
                            "updated_at": at_version,
                        }
                    )
                    attempts.append(
                        {
                            "outbox_id": outbox_id,
                            "study_instance_uid": uid,
                            "study_version": version,
                            "destination": "pacs",
                            "attempt": 1,
                            "started_at": at_version,
                            "ended_at": at_version,
                            "outcome": {"sent": "sent", "dead": "dead"}.get(sent, "retry"),
                            "status": 0 if sent == "sent" else None,
                            "error": None if sent == "sent" else "cannot reach 127.0.0.1:4242",
                        }
                    )
                if n == count // 2:
                    middle = uid
            with transaction(sessions) as session:
                for model, rows in (
                    (Study, studies),
                    (Instance, instances),
                    (Job, jobs),
                    (ApiCall, calls),
                    (Outbox, sends),
                    (DeliveryAttempt, attempts),
                ):
                    session.execute(insert(model), rows)
    return middle, many


def _time(client: httpx.Client, path: str, rounds: int) -> tuple[float, int, int]:
    times = []
    status = size = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - t0) * 1000)
        status, size = response.status_code, len(response.content)
    return statistics.median(times), status, size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root}/ainode.db"
        t0 = time.perf_counter()
        middle, many = fill(url, args.studies)
        print(f"{args.studies} synthetic studies written in {time.perf_counter() - t0:.1f} s")
        settings = Settings(
            storage={"root": root, "database_url": url, "min_free_mb": 1},  # type: ignore[arg-type]
            http={"host": "127.0.0.1", "port": 0},  # type: ignore[arg-type]
        )
        with open_database(url) as sessions:
            server = WebServer(settings, sessions)
            server.start()
            try:
                pages = [
                    "/studies",
                    "/studies?page=1000",
                    "/studies?state=failed",
                    "/studies?modality=MR",
                    "/studies?ae=CT02&state=done",
                    f"/studies?uid={middle[:-2]}",
                    f"/studies/{middle}",
                    f"/studies/{many}",
                    "/studies?state=superseded",
                    "/deliveries",
                    "/costs",
                    "/health",
                    "/metrics",
                ]
                with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=120) as client:
                    client.get("/studies")  # warm the page cache and the templates
                    print(f"{'page':45} {'median ms':>10} {'status':>7} {'bytes':>9}")
                    for path in pages:
                        median, status, size = _time(client, path, args.rounds)
                        print(f"{path:45} {median:10.1f} {status:7d} {size:9d}")
            finally:
                server.stop()
            t0 = time.perf_counter()
            with sessions() as session:
                rows = study_rows(session)
            print(
                f"ainode status's query layer (storage.overview.study_rows), all {len(rows)} studies: "
                f"{(time.perf_counter() - t0) * 1000:.0f} ms"
            )


if __name__ == "__main__":
    main()
