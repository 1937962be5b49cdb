"""Crashes, many callers, stalled and half-open connections."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import create_engine, func, select

from scp.dataset_check import check_dataset_file
from storage.models import Instance, Job
from tests.data.generate import write_series
from tests.nodes import DCMTK, DCMTK_ENV, Node, NodeFactory, dcmtk, stop_process, store_raw
from tests.scp.test_dataset_check import deflate_bomb, hostile_instance


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


def store_at_once_watching_memory(node: Node, paths: list[Path]) -> tuple[list[int], int]:
    """C-STORE each file from its own association, all at once; the statuses and the node's
    peak memory meanwhile (PSS of its main process and its receivers)."""
    assert node.proc is not None
    node_process = psutil.Process(node.proc.pid)
    statuses: list[int] = []
    peak = 0
    done = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                processes = [node_process, *node_process.children()]
                peak = max(peak, sum(p.memory_full_info().pss for p in processes))
            except psutil.Error:
                pass
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    senders = [
        threading.Thread(target=lambda p=path: statuses.append(store_raw(node.port, p))) for path in paths
    ]
    try:
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=300)
    finally:
        done.set()
        watcher.join()
    return statuses, peak


def test_ten_deflate_bombs_at_once_are_refused_and_memory_stays_flat(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """Each file is under 1 MB and inflates to 1 GiB: ten at once get 0xC000 while the node's
    memory (main process and receivers, PSS) stays under 300 MB, and it keeps serving."""
    node = make_node().start()
    bombs = [deflate_bomb(tmp_path / "bomb.dcm", 1024)] * 10  # ten modalities, one file
    statuses, peak = store_at_once_watching_memory(node, bombs)
    assert statuses == [0xC000] * 10
    assert peak < 300 << 20, f"peak {peak >> 20} MiB"
    assert node.stored_files() == [] and list((node.root / "tmp").iterdir()) == []
    assert dcmtk("echoscu", "-aec", "AINODE", "127.0.0.1", str(node.port)).returncode == 0


def test_ten_hostile_instances_at_once_are_refused_with_reasons_and_memory_stays_flat(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """A million sequence items, a million empty pixel data fragments, a million empty elements,
    200 nested sequences, a billion frames over two bytes of pixel data: each 0xC000 with its
    reason logged, ten at once, the node's memory (PSS of all its processes) under 300 MB, nothing
    kept, and the node keeps serving."""
    node = make_node().start()
    kinds = ["items", "fragments", "elements", "nesting", "frames"] * 2
    hostile = [
        hostile_instance(tmp_path / f"{kind}-{i}.dcm", kind, f"1.2.3.4.5.{i + 1}")
        for i, kind in enumerate(kinds)
    ]
    statuses, peak = store_at_once_watching_memory(node, hostile)
    assert statuses == [0xC000] * 10
    assert peak < 300 << 20, f"peak {peak >> 20} MiB"
    assert node.stored_files() == [] and list((node.root / "tmp").iterdir()) == []
    log = node.log.read_text()
    for reason in (
        "more than 200000 sequence items (node.max_sequence_items)",
        "more than 200000 sequence items, pixel data fragments included (node.max_sequence_items)",
        "more than 1000000 data elements (node.max_data_elements)",
        "sequences nested past 64 levels",
        "Number of Frames 1000000000 is past 100000 (node.max_frames)",
    ):
        assert reason in log
    assert store_raw(node.port, write_series(tmp_path / "ct", 1)[0]) == 0x0000
