"""Load: five senders push ten 40-instance studies at once while the model takes 2 s.

    python -m benchmarks.load [--senders 5] [--studies 10] [--instances 40] [--latency-ms 2000]

The node (``ainode serve``, SQLite) analyses with the simulator and sends SRs to a pynetdicom
PACS that counts every C-STORE it receives. Checks that every instance was acknowledged 0x0000
and that each study got exactly one SR (one C-STORE, not one distinct UID: a duplicate send would
show); prints the C-STORE latency seen by the senders (p50, p99, max) and studies per minute from
the first instance sent to the last SR stored.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    CTImageStorage,
)

from tests.data.generate import write_series
from tests.nodes import Node, free_port, simulator


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def _send(port: int, studies: list[list[Path]], latencies: list[float], statuses: Counter[int]) -> None:
    """One modality: each of its studies over its own association, one instance at a time."""
    for files in studies:
        ae = AE(ae_title="LOADSCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        if not assoc.is_established:
            raise RuntimeError("association with the node was not established")
        try:
            for path in files:
                dataset = dcmread(path)
                started = time.perf_counter()
                status = assoc.send_c_store(dataset)
                latencies.append((time.perf_counter() - started) * 1000)
                statuses[int(status.Status) if "Status" in status else -1] += 1
        finally:
            assoc.release()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=5)
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--instances", type=int, default=40)
    parser.add_argument("--latency-ms", type=float, default=2000)
    args = parser.parse_args()

    received: list[str] = []
    lock = threading.Lock()

    def on_store(event: evt.Event) -> int:
        with lock:
            received.append(str(event.dataset.StudyInstanceUID))
        return 0x0000

    pacs = AE(ae_title="COUNTPACS")
    pacs.add_supported_context(Comprehensive3DSRStorage)
    pacs_port = free_port()
    server = pacs.start_server(
        ("127.0.0.1", pacs_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    if server is None:
        raise RuntimeError("the counting PACS did not start")
    with tempfile.TemporaryDirectory(prefix="ainode-load-") as tmp:
        work = Path(tmp)
        studies = {
            uid: write_series(work / f"study{n}", args.instances, study_instance_uid=uid)
            for n, uid in enumerate(generate_uid() for _ in range(args.studies))
        }
        per_sender: list[list[list[Path]]] = [[] for _ in range(args.senders)]
        for n, files in enumerate(studies.values()):
            per_sender[n % args.senders].append(files)
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        with simulator(work, "--latency-ms", str(args.latency_ms)) as url:
            node_dir = work / "node"
            node_dir.mkdir()
            node = Node(
                node_dir,
                vision={"provider": "simulator", "base_url": url, "requests_per_minute": 0},
                study={"settle_seconds": 2},
                worker={"poll_seconds": 0.1},
                delivery={"poll_seconds": 0.1},
                destinations=[
                    {
                        "name": "pacs",
                        "ae_title": "COUNTPACS",
                        "host": "127.0.0.1",
                        "port": pacs_port,
                        "outputs": ["sr"],
                    }
                ],
            ).start()
            try:
                started = time.perf_counter()
                senders = [
                    threading.Thread(target=_send, args=(node.port, mine, latencies, statuses))
                    for mine in per_sender
                ]
                for thread in senders:
                    thread.start()
                for thread in senders:
                    thread.join()
                sent = time.perf_counter()
                deadline = time.monotonic() + 600
                while len(set(received)) < args.studies and time.monotonic() < deadline:
                    time.sleep(0.1)
                finished = time.perf_counter()
                time.sleep(3)  # a duplicate delivery would arrive now
                rows = {row["study_instance_uid"]: row for row in node.status()}
            finally:
                node.stop()
                server.shutdown()
    total = args.studies * args.instances
    per_study = Counter(received)
    print(
        f"{args.senders} senders, {args.studies} studies x {args.instances} instances, "
        f"model latency {args.latency_ms:g} ms"
    )
    print(f"  C-STORE responses: {dict(statuses)} (all 0x0000: {statuses[0] == total})")
    print(
        f"  C-STORE latency at the senders: p50 {_percentile(latencies, 0.5):.1f} ms, "
        f"p99 {_percentile(latencies, 0.99):.1f} ms, max {max(latencies):.1f} ms, "
        f"mean {statistics.fmean(latencies):.1f} ms"
    )
    print(f"  ingest: {total / (sent - started):.0f} instances/s over {sent - started:.1f} s")
    print(
        f"  SRs at the PACS: {len(received)} C-STOREs for {len(per_study)} studies; exactly one each: "
        f"{sorted(per_study.values()) == [1] * args.studies}"
    )
    print(
        f"  studies/minute (first instance sent to last SR stored): "
        f"{args.studies / ((finished - started) / 60):.1f} over {finished - started:.1f} s"
    )
    states = Counter(row["state"] for row in rows.values())
    print(f"  study states at the node: {dict(states)}")


if __name__ == "__main__":
    main()
