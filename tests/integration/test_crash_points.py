"""Crash at every named point (storage/crashpoints.py), restart, and check what must hold:
every instance the modality saw acknowledged is listed and readable, the study ends with exactly
one SR at the PACS, and a model answer that was committed is never paid for again.

The PACS is a pynetdicom SCP that counts every C-STORE (Orthanc deduplicates by SOP Instance
UID, so it could not see a second send). SIGKILL-style exits keep the page cache: these tests
prove ordering and recovery, not fsync."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from scp.dataset_check import check_dataset_file
from storage.crashpoints import CRASH_EXIT_CODE, POINTS
from tests.data.generate import write_series
from tests.integration.test_delivery import refusing_pacs
from tests.integration.test_resilience import _acknowledged
from tests.nodes import DCMTK, DCMTK_ENV, Node, NodeFactory, simulator

COUNT = 6


def _storescu(node: Node, files: list[Path]) -> str:
    sent = subprocess.run(
        [str(DCMTK / "storescu"), "-v", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files)],
        capture_output=True,
        text=True,
        env=DCMTK_ENV,
        timeout=120,
    )
    return sent.stdout + sent.stderr


def _requests(record: Path) -> int:
    return len(record.read_text().splitlines()) if record.exists() else 0


@pytest.mark.parametrize("point", sorted(POINTS))
def test_a_crash_at_each_point_loses_nothing_and_repeats_nothing(
    make_node: NodeFactory, tmp_path: Path, point: str
) -> None:
    study = generate_uid()
    files = write_series(tmp_path / "ct", COUNT, study_instance_uid=study)
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--record", str(record)) as url, refusing_pacs(0x0000) as (port, pacs):
        node = make_node(
            vision={"provider": "simulator", "base_url": url},
            worker={"poll_seconds": 0.2},
            delivery={"retry_base_seconds": 0.2, "retry_cap_seconds": 0.5, "poll_seconds": 0.2},
            # The SR alone: one file per version to count (the summary image is tested end to end).
            destinations=[
                {
                    "name": "pacs",
                    "ae_title": "PICKYPACS",
                    "host": "127.0.0.1",
                    "port": port,
                    "outputs": ["sr"],
                }
            ],
        )
        node.start(env={"AINODE_CRASH_AT": point})
        first = _storescu(node, files)
        assert node.proc is not None
        assert node.proc.wait(timeout=60) == CRASH_EXIT_CODE, (node.workdir / "node.log").read_text()[-2000:]
        acked = _acknowledged(first)
        calls_before = _requests(record)

        restarted = time.monotonic()
        node.start()  # the same storage and database, no crash armed
        for path in acked:  # every acknowledged instance is there and whole
            sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            (stored,) = node.root.glob(f"instances/{study}/*/{sop}.*.dcm")
            check_dataset_file(stored, "1.2.840.10008.5.1.4.1.1.2", sop)
        if point.startswith("ingest."):
            assert acked == []  # the crash came before the first response
            assert "Success" in _storescu(node, files)  # the modality sends again
        row = node.wait_for_state(study, "done", timeout=60)
        recovered = time.monotonic() - restarted
        time.sleep(1)  # a wrong second delivery would arrive now
    assert row["instance_count"] == COUNT and row["version"] == 1
    assert set(pacs) == {row["sr_sop_instance_uid"]}  # one SR, the one the node names
    # At-least-once across a crash between the PACS's answer and our commit: the same SR again.
    assert len(pacs) == (2 if point == "delivery.mid_send" else 1)
    paid_again = point == "analysis.after_model_reply"  # answered, but nothing of it committed
    expected_calls = 2 if paid_again else 1
    assert _requests(record) == expected_calls, f"{calls_before} call(s) before the crash"
    assert recovered < 60
