"""Several processes receiving on one port (scp/receivers.py): they share the work, they are one
unit with the node (killed with it, stopping it when one dies), and no second node can share the
port by accident."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from conf import NodeSettings, Settings
from scp.receivers import receiver_count
from tests.data.generate import write_series
from tests.nodes import Node, NodeFactory, dcmtk, wait_for_port

RECEIVERS = 3


def _receivers(node: Node) -> list[psutil.Process]:
    assert node.proc is not None
    deadline = time.monotonic() + 10
    while True:
        children = psutil.Process(node.proc.pid).children()
        listening = [c for c in children if _listens(c, node.port)]
        if len(listening) == RECEIVERS - 1 or time.monotonic() > deadline:
            return listening
        time.sleep(0.1)


def _listens(process: psutil.Process, port: int) -> bool:
    try:
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in process.net_connections())
    except psutil.Error:
        return False


def _commit_process(node: Node) -> psutil.Process:
    """The node's child that does not listen: the commit process (storage/commit_process.py)."""
    assert node.proc is not None
    others = [c for c in psutil.Process(node.proc.pid).children() if not _listens(c, node.port)]
    assert len(others) == 1, others
    return others[0]


def _serving(process: psutil.Process, port: int) -> int:
    return sum(
        c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port for c in process.net_connections()
    )


def _gone(processes: list[psutil.Process], timeout: float = 10) -> bool:
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return not alive


def test_receivers_share_the_port_and_the_work(make_node: NodeFactory, tmp_path: Path) -> None:
    node = make_node(node={"receiver_processes": RECEIVERS}).start()
    assert node.proc is not None
    receivers = _receivers(node)
    assert len(receivers) == RECEIVERS - 1
    committer = _commit_process(node)
    # Eight associations held open at once land on more than one process (the kernel hashes
    # each connection to one of the three sockets: all eight on one has odds of 1 in 2187).
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    held: list[Association] = [ae.associate("127.0.0.1", node.port, ae_title="AINODE") for _ in range(8)]
    try:
        assert all(a.is_established for a in held)
        everyone = [psutil.Process(node.proc.pid), *receivers]
        assert sum(_serving(p, node.port) > 0 for p in everyone) >= 2
    finally:
        for assoc in held:
            assoc.release()
    # Eight modalities at once, five images each: every one acknowledged and recorded once.
    series = [write_series(tmp_path / f"ct{i}", 5) for i in range(8)]
    results: list[int] = []

    def send(files: list[Path]) -> None:
        sent = dcmtk("storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files))
        results.append(sent.returncode)

    threads = [threading.Thread(target=send, args=(files,)) for files in series]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == [0] * 8
    counts = sorted(row["instance_count"] for row in node.status())
    assert counts == [5] * 8
    assert len(node.stored_files()) == 40
    node.stop()  # SIGTERM: a clean stop of the node and of every receiver
    assert node.proc.returncode == 0
    assert _gone([*receivers, committer])


def test_receivers_die_with_a_killed_node(make_node: NodeFactory) -> None:
    node = make_node(node={"receiver_processes": RECEIVERS}).start()
    receivers = _receivers(node)
    assert len(receivers) == RECEIVERS - 1
    committer = _commit_process(node)
    node.kill9()
    assert _gone([*receivers, committer])  # nothing left listening on the node's port
    assert dcmtk("echoscu", "-aec", "AINODE", "127.0.0.1", str(node.port)).returncode != 0
    node.start()  # the port is free for the restarted node
    assert dcmtk("echoscu", "-aec", "AINODE", "127.0.0.1", str(node.port)).returncode == 0


def test_a_receiver_that_dies_stops_the_node(make_node: NodeFactory) -> None:
    node = make_node(node={"receiver_processes": RECEIVERS}).start()
    assert node.proc is not None
    receivers = _receivers(node)
    os.kill(receivers[0].pid, signal.SIGKILL)
    assert node.proc.wait(timeout=60) == 1  # for the service manager to restart it whole
    assert _gone(receivers)
    assert (
        f"process {receivers[0].pid} (a receiver or the commit process) exited"
        in (node.workdir / "node.log").read_text()
    )


def test_a_commit_process_that_dies_stops_the_node(make_node: NodeFactory, tmp_path: Path) -> None:
    node = make_node(node={"receiver_processes": RECEIVERS}).start()
    assert node.proc is not None
    receivers = _receivers(node)
    committer = _commit_process(node)
    files = write_series(tmp_path / "ct", 3)
    assert dcmtk("storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files)).returncode == 0
    os.kill(committer.pid, signal.SIGKILL)
    assert node.proc.wait(timeout=60) == 1  # for the service manager to restart it whole
    assert _gone(receivers)
    assert (
        f"process {committer.pid} (a receiver or the commit process) exited"
        in (node.workdir / "node.log").read_text()
    )
    node.start()  # what was acknowledged before is there; the restarted node stores again
    assert [row["instance_count"] for row in node.status()] == [3]
    more = write_series(tmp_path / "ct2", 2)
    assert dcmtk("storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, more)).returncode == 0
    assert sorted(row["instance_count"] for row in node.status()) == [2, 3]


def test_a_second_node_cannot_share_the_port(make_node: NodeFactory) -> None:
    first = make_node(node={"receiver_processes": RECEIVERS}).start()
    second = make_node(node={"receiver_processes": RECEIVERS, "port": first.port})
    started = second.cli("serve", check=False)
    assert started.returncode == 1
    assert f"node.port {first.port} on 127.0.0.1 is in use" in started.stderr
    assert dcmtk("echoscu", "-aec", "AINODE", "127.0.0.1", str(first.port)).returncode == 0


def test_a_stop_signal_to_the_whole_group_is_a_clean_stop(make_node: NodeFactory) -> None:
    # Ctrl-C in a terminal signals the node's whole process group, systemd's stop its whole
    # cgroup: the receivers stop on the same signal, before the main process has stopped its
    # roles. That is the node stopping, not a receiver failing.
    for signum in (signal.SIGINT, signal.SIGTERM):
        node = make_node(node={"receiver_processes": RECEIVERS}, vision={"provider": "simulator"})
        with node.log.open("ab") as log:
            node.proc = subprocess.Popen(
                [sys.executable, "-m", "scp.cli", "-c", str(node.config), "serve"],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=node.workdir,
                start_new_session=True,  # its own group, as a shell's foreground job
            )
        wait_for_port(node.port, proc=node.proc)
        receivers = _receivers(node)
        assert len(receivers) == RECEIVERS - 1
        committer = _commit_process(node)
        os.killpg(node.proc.pid, signum)  # the group the node leads: the node and its receivers
        assert node.proc.wait(timeout=60) == 0
        assert _gone([*receivers, committer])
        assert "exited with status" not in node.log.read_text()


def test_a_stopping_node_accepts_no_new_association_on_any_receiver(make_node: NodeFactory) -> None:
    # SIGTERM while the main process holds an association: it waits for that one (the grace
    # period), and meanwhile no receiver takes new work that would only be cut at the end.
    node = make_node(node={"receiver_processes": RECEIVERS}).start()
    assert node.proc is not None
    main = psutil.Process(node.proc.pid)
    ae = AE(ae_title="PACS")
    ae.add_requested_context(Verification)
    held: list[Association] = []
    try:
        while not _serving(main, node.port) and len(held) < 40:
            held.append(ae.associate("127.0.0.1", node.port, ae_title="AINODE"))
        assert _serving(main, node.port)
        os.kill(node.proc.pid, signal.SIGTERM)
        time.sleep(2)  # the main process's listener and every receiver's have stopped accepting
        assert node.proc.poll() is None  # still waiting for its held association
        assert dcmtk("echoscu", "-to", "5", "-aec", "AINODE", "127.0.0.1", str(node.port)).returncode != 0
    finally:
        for assoc in held:
            assoc.release()
    assert node.proc.wait(timeout=60) == 0


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000", None), ("150000 100000", 2), ("50000 100000", 1), ("garbage", None)],
)
def test_one_receiver_per_cpu_the_container_allows(
    tmp_path: Path, cpu_max: str, expected: int | None
) -> None:
    limit = tmp_path / "cpu.max"
    limit.write_text(cpu_max + "\n")
    cores = len(os.sched_getaffinity(0))
    count = receiver_count(Settings(), cgroup_cpu_max=limit)
    assert count == (cores if expected is None else min(cores, expected))
    assert receiver_count(Settings(node=NodeSettings(receiver_processes=5)), cgroup_cpu_max=limit) == 5
