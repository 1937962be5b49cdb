"""Ingest throughput: the same CT series sent by DCMTK storescu to ainode, storescp and Orthanc.

    python -m benchmarks.ingest [--instances 500] [--rounds 3] [--big-gb 2]

Prints instances/s and MB/s per receiver and round, the medians, the ratios, and the node's
peak RSS while it ingests a study of ``--big-gb`` GB made of 256 MB multi-frame instances.
ainode runs durable (fsync + rename + commit per instance, SQLite WAL synchronous=FULL);
storescp and Orthanc run with their defaults.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.data.generate import write_series
from tests.nodes import DCMTK, DCMTK_ENV, Node, free_port, orthanc, stop_process, wait_for_port


@contextmanager
def run_ainode(workdir: Path) -> Iterator[tuple[int, int]]:
    node = Node(workdir, study={"settle_seconds": 30.0}).start()
    try:
        assert node.proc is not None
        yield node.port, node.proc.pid
    finally:
        node.stop()


@contextmanager
def run_storescp(workdir: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    out = workdir / "storescp"
    out.mkdir()
    proc = subprocess.Popen(
        [str(DCMTK / "storescp"), "-od", str(out), "+B", str(port)],
        env=DCMTK_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield port, proc.pid
    finally:
        stop_process(proc)


@contextmanager
def run_orthanc(workdir: Path) -> Iterator[tuple[int, int]]:
    with orthanc(workdir) as ports:
        yield ports["dicom_port"], ports["pid"]


def send(port: int, called_ae: str, files: list[Path]) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        [str(DCMTK / "storescu"), "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        env=DCMTK_ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"storescu to port {port} failed: {result.stderr[-500:]}")
    return elapsed


def fresh_uids(files: list[Path]) -> None:
    """New SOP Instance UIDs so every round stores new instances, not duplicates."""
    study = generate_uid()
    for path in files:
        ds = dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.save_as(path)
    # Write the rewritten series out now: left dirty, it would be flushed by the first fsync of
    # whichever receiver fsyncs (ours), charging our run for the benchmark's own setup.
    os.sync()


def peak_rss_during(pid: int, action: Callable[[], object]) -> tuple[float, int]:
    peak = 0
    done = threading.Event()
    process = psutil.Process(pid)

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                peak = max(peak, process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        action()
    finally:
        done.set()
        sampler.join()
    return time.perf_counter() - started, peak


def write_big_study(folder: Path, gigabytes: float) -> list[Path]:
    template = dcmread(write_series(folder / "template", 1)[0])
    frames = 512  # 512 x 512 x 16 bit x 512 frames = 256 MiB per instance
    count = max(1, round(gigabytes * 1024 / 256))
    study = generate_uid()
    paths = []
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4000, size=(frames, 512, 512), dtype=np.uint16)
    for index in range(count):
        ds = template
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.NumberOfFrames = frames
        ds.PixelData = pixels.tobytes()
        path = folder / f"big{index}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big-gb", type=float, default=2.0, help="0 skips the RSS run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ainode-bench-") as tmp:
        work = Path(tmp)
        files = write_series(work / "series", args.instances)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(f"series: {len(files)} instances, {megabytes:.0f} MB (CT 512x512x16 bit)")
        receivers = {
            "ainode": (run_ainode, "AINODE"),
            "storescp": (run_storescp, "STORESCP"),
            "orthanc": (run_orthanc, "ORTHANC"),
        }
        results: dict[str, list[float]] = {name: [] for name in receivers}
        for round_ in range(1, args.rounds + 1):
            for name, (runner, called) in receivers.items():
                fresh_uids(files)
                folder = work / f"{name}-{round_}"
                folder.mkdir()
                with runner(folder) as (port, _pid):
                    seconds = send(port, called, files)
                rate = len(files) / seconds
                results[name].append(rate)
                print(f"round {round_} {name:9s} {rate:8.1f} inst/s {megabytes / seconds:8.1f} MB/s")
        medians = {name: statistics.median(rates) for name, rates in results.items()}
        print("\nmedian over rounds:")
        for name, rate in medians.items():
            print(f"  {name:9s} {rate:8.1f} inst/s {rate * megabytes / len(files):8.1f} MB/s")
        print(f"  ainode / orthanc  = {medians['ainode'] / medians['orthanc']:.2f}")
        print(f"  ainode / storescp = {medians['ainode'] / medians['storescp']:.2f}")

        if args.big_gb > 0:
            big = write_big_study(work / "big", args.big_gb)
            total = sum(p.stat().st_size for p in big) / 2**30
            folder = work / "ainode-big"
            folder.mkdir()
            with run_ainode(folder) as (port, pid):
                seconds, peak = peak_rss_during(pid, lambda: send(port, "AINODE", big))
            print(
                f"\nbig study: {len(big)} instances, {total:.2f} GiB in {seconds:.1f} s; "
                f"ainode peak RSS {peak / 2**20:.0f} MiB"
            )


if __name__ == "__main__":
    main()
