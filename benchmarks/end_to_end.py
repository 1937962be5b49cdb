"""End to end: a 300-slice CT from the last instance received to the SR stored in Orthanc.

    python -m benchmarks.end_to_end [--slices 300] [--latency-ms 200] [--settle 1]

The node runs with the simulator (fixed latency) and Orthanc as the PACS. Prints the wall time
from storescu's last response to the SR in Orthanc, the overhead once the settle time and the
simulator's latency are taken off, and its parts from the node's own log (prepare: load, render,
encode; report: SR build and write; commit; send).
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from pydicom.uid import generate_uid

from tests.data.generate import write_series
from tests.nodes import Node, dcmtk, orthanc, simulator


def _sr_present(http_port: int, study: str) -> bool:
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as client:
        found = [f["ID"] for f in client.post("/tools/lookup", content=study).json() if f["Type"] == "Study"]
        if not found:
            return False
        series = client.get(f"/studies/{found[0]}/series").json()
        return any(s["MainDicomTags"]["Modality"] == "SR" for s in series)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ainode-e2e-") as tmp:
        work = Path(tmp)
        overheads: list[float] = []
        with simulator(work, "--latency-ms", str(args.latency_ms)) as url, orthanc(work) as ports:
            node_dir = work / "node"
            node_dir.mkdir()
            node = Node(
                node_dir,
                vision={"provider": "simulator", "base_url": url},
                study={"settle_seconds": args.settle},
                worker={"poll_seconds": 0.05},
                delivery={"poll_seconds": 0.05},
                destinations=[
                    {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": ports["dicom_port"]}
                ],
            ).start()
            try:
                for round_ in range(1, args.rounds + 1):
                    study = generate_uid()
                    files = write_series(work / f"ct{round_}", args.slices, study_instance_uid=study)
                    sent = dcmtk("storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files))
                    received = time.perf_counter()
                    if sent.returncode != 0:
                        raise RuntimeError(sent.stderr[-500:])
                    while not _sr_present(ports["http_port"], study):
                        time.sleep(0.02)
                    wall = time.perf_counter() - received
                    overhead = wall - args.settle - args.latency_ms / 1000
                    overheads.append(overhead)
                    print(
                        f"round {round_}: SR in Orthanc {wall:.3f} s after the last instance; "
                        f"overhead {overhead:.3f} s (minus settle {args.settle:g} s and latency "
                        f"{args.latency_ms:g} ms)"
                    )
            finally:
                node.stop()
        log = node.log.read_text()
        timings = re.findall(
            r"timings: prepare (\d+) ms, model (\d+) ms, report (\d+) ms, commit (\d+) ms", log
        )
        sends = [int(m) for m in re.findall(r"stored, attempt \d+, (\d+) ms", log)]
        print(
            f"\n{args.slices}-slice CT, simulator {args.latency_ms:g} ms, settle {args.settle:g} s, "
            f"median of {args.rounds}: overhead {statistics.median(overheads):.3f} s (target < 1.5 s)"
        )
        for index, name in enumerate(
            (
                "prepare (load, render, encode)",
                "model call (incl. latency)",
                "report (build and write SR)",
                "commit",
            )
        ):
            print(f"  {name:32s} {statistics.median(int(t[index]) for t in timings):6.0f} ms")
        print(f"  {'send (C-STORE to Orthanc)':32s} {statistics.median(sends):6.0f} ms")
        print("  the rest: settle detection and queue polling (poll intervals 50 ms)")


if __name__ == "__main__":
    main()
