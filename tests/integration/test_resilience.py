"""Crashes, many callers, stalled and half-open connections."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import create_engine, func, select

from scp.dataset_check import check_dataset_file
from storage.models import Instance, Job
from tests.data.generate import write_series
from tests.nodes import DCMTK, DCMTK_ENV, NodeFactory, dcmtk, stop_process


def _acknowledged(storescu_output: str) -> list[str]:
    """Files storescu -v saw answered with Success, in order."""
    acked: list[str] = []
    current = None
    for line in storescu_output.splitlines():
        if m := re.search(r"Sending file: (\S+)", line):
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def test_kill_9_mid_transfer_loses_no_acknowledged_instance(make_node: NodeFactory, tmp_path: Path) -> None:
    node = make_node(study={"settle_seconds": 2.0}).start()
    files = write_series(tmp_path / "ct", 120)
    sender = subprocess.Popen(
        [str(DCMTK / "storescu"), "-v", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=DCMTK_ENV,
    )
    try:
        deadline = time.monotonic() + 60
        while len(node.stored_files()) < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
        node.kill9()
        output, _ = sender.communicate(timeout=60)
    finally:
        stop_process(sender)
    acked = _acknowledged(output)
    assert 20 <= len(acked) < 120, output[-2000:]

    node.start()  # same storage, same database
    assert list((node.root / "tmp").iterdir()) == []  # partial files purged
    engine = create_engine(node.database_url)
    try:
        with engine.connect() as conn:
            rows = {r.sop_instance_uid: r.path for r in conn.execute(select(Instance))}
        for path in acked:
            sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            assert sop in rows, f"acknowledged {path} is not in the database"
            stored = node.root / rows[sop]
            summary = check_dataset_file(stored, "1.2.840.10008.5.1.4.1.1.2", sop)
            assert summary.pixel_data_length == 512 * 512 * 2
        for stored in node.stored_files():  # nothing half-written is visible
            check_dataset_file(stored, "1.2.840.10008.5.1.4.1.1.2", stored.name.rsplit(".", 2)[0])

        resent = dcmtk("storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files))
        assert resent.returncode == 0, resent.stderr
        study_uid = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        row = node.wait_for_state(study_uid, "waiting", timeout=20)
        assert row["instance_count"] == 120
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(Job)) == 1
    finally:
        engine.dispose()


def test_fifty_concurrent_associations_with_half_open_connections_present(make_node: NodeFactory) -> None:
    node = make_node().start()
    half_open = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(10)]
    try:
        results: list[int] = []
        lock = threading.Lock()
        barrier = threading.Barrier(50)

        def one() -> None:
            ae = AE(ae_title="PACS")
            ae.add_requested_context(Verification)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            barrier.wait()
            assoc = ae.associate("127.0.0.1", node.port, ae_title="AINODE")
            status = -1
            if assoc.is_established:
                barrier_time = time.monotonic()
                while time.monotonic() - barrier_time < 1.0:  # hold all 50 open at once
                    time.sleep(0.05)
                status = int(assoc.send_c_echo().Status)
                assoc.release()
            with lock:
                results.append(status)

        threads = [threading.Thread(target=one) for _ in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert results == [0] * 50
    finally:
        for sock in half_open:
            sock.close()


def test_a_peer_that_stalls_mid_pdu_is_dropped_within_the_network_timeout(make_node: NodeFactory) -> None:
    node = make_node(node={"network_timeout_seconds": 2, "acse_timeout_seconds": 2}).start()
    with socket.create_connection(("127.0.0.1", node.port)) as stalled:
        stalled.sendall(b"\x01\x00\x00\x00\x01\x00")  # A-ASSOCIATE-RQ header promising 256 bytes
        stalled.settimeout(15)
        started = time.monotonic()
        try:
            closed = stalled.recv(1024)
        except ConnectionResetError:
            closed = b""
        elapsed = time.monotonic() - started
    assert elapsed < 10, f"stalled peer held for {elapsed:.1f} s"
    assert closed == b"" or closed[:1] in (b"\x03", b"\x07")  # closed, rejected or aborted
    assert dcmtk("echoscu", "-aec", "AINODE", "127.0.0.1", str(node.port)).returncode == 0
