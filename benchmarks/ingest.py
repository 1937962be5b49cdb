"""Ingest throughput: the same CT series sent by DCMTK storescu to ainode, storescp and Orthanc.

    python -m benchmarks.ingest [--patterns single,concurrent,small] [--rounds 3] [--big-gb 2]

Three sending patterns: one association of 300 CT slices; ten modalities sending 50 slices each
at once; fifty associations of twenty small (40 KB) images at once. Prints instances/s, MB/s and
peak RSS per receiver and round (PSS sampled every 250 ms: a lower bound), its CPU per
instance (user and system) and how busy the whole machine was (the senders run on it too: where
it is near 100%, CPU per instance decides the ratio), the medians and the ratios; then the
node's peak RSS while ten associations send ``--big-gb`` GB of 256 MB multi-frame instances
(sampled every 20 ms).
ainode runs durable (bytes and folder fsynced, row committed, SQLite WAL synchronous=FULL, before
each 0x0000); storescp and Orthanc run with their defaults. Orthanc 1.10 fdatasyncs each file
but not its folder, and its SQLite index syncs only at checkpoints (seen with strace: 100
instances, 100 file fdatasyncs, 6 of the index and its WAL).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.data.generate import CT_512, CT_SMALL, write_series
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


def send_at_once(port: int, called_ae: str, batches: list[list[Path]]) -> float:
    """One storescu per batch, all started together; seconds until the last one finished."""
    errors: list[BaseException] = []

    def one(files: list[Path]) -> None:
        try:
            send(port, called_ae, files)
        except BaseException as exc:  # reported below, after every sender finished
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(batch,)) for batch in batches]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(batches)} senders failed: {errors[0]}")
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


def cpu_seconds(process: psutil.Process) -> tuple[float, float]:
    """User and system CPU time of ``process`` and its children so far."""
    user = system = 0.0
    for each in [process, *process.children(recursive=True)]:
        try:
            times = each.cpu_times()
        except psutil.Error:
            continue
        user += times.user
        system += times.system
    return user, system


def machine_cpu() -> tuple[int, int]:
    """All CPU time and idle time (idle + iowait) of the machine so far, in clock ticks."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    return sum(ticks), ticks[3] + ticks[4]


@dataclass(frozen=True)
class Measured:
    seconds: float
    peak: int  # bytes
    user: float  # CPU seconds of the receiver
    system: float
    machine_busy: float  # share of all cores busy (receiver, senders, kernel), 0..1

    def cpu_ms_per_instance(self, count: int) -> float:
        return (self.user + self.system) * 1000 / count

    def per_instance(self, count: int) -> str:
        return (
            f"CPU {self.cpu_ms_per_instance(count):5.2f} ms/inst (user "
            f"{self.user * 1000 / count:4.2f}, system {self.system * 1000 / count:4.2f})  "
            f"machine {self.machine_busy * 100:3.0f}% busy"
        )


# How often the peak memory is sampled while throughput is measured. A sample of PSS walks the
# page tables of every process of the receiver: 3.9-5.7 ms for ainode's three (main, receiver,
# commit process), 0.4 ms for Orthanc's one (measured). Every 20 ms, as the RSS run samples,
# that took about a fifth of a core from the machine during ainode's rounds alone.
THROUGHPUT_SAMPLE_SECONDS = 0.25
RSS_RUN_SAMPLE_SECONDS = 0.02


def peak_rss_during(
    pid: int, action: Callable[[], object], every_seconds: float = THROUGHPUT_SAMPLE_SECONDS
) -> Measured:
    """How long ``action`` took, the peak memory of ``pid`` and its children (summed PSS: for
    one process, its RSS less its share of shared libraries; sampled every ``every_seconds``),
    the CPU they spent, and how busy the whole machine was: on two cores shared with the
    senders, CPU per instance is what caps a receiver with many senders."""
    peak = 0
    done = threading.Event()
    process = psutil.Process(pid)
    user_before, system_before = cpu_seconds(process)
    ticks_before, idle_before = machine_cpu()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:  # the node's receiving processes are its children (scp.receivers); PSS counts
                # the pages a fork shares once
                processes = [process, *process.children(recursive=True)]
                peak = max(peak, sum(p.memory_full_info().pss for p in processes))
            except psutil.Error:
                return
            done.wait(every_seconds)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    try:
        action()
    finally:
        done.set()
        sampler.join()
    seconds = time.perf_counter() - started
    user, system = cpu_seconds(process)
    ticks, idle = machine_cpu()
    busy = 1 - (idle - idle_before) / max(1, ticks - ticks_before)
    return Measured(seconds, peak, user - user_before, system - system_before, busy)


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


@dataclass(frozen=True)
class Pattern:
    name: str
    senders: int
    instances: int  # per sender
    source: str


PATTERNS = {
    "single": Pattern("one association x 300 CT 512x512", 1, 300, CT_512),
    "concurrent": Pattern("10 associations at once x 50 CT 512x512", 10, 50, CT_512),
    "small": Pattern("50 associations at once x 20 CT 128x128 (40 KB)", 50, 20, CT_SMALL),
}
RECEIVERS = {
    "ainode": (run_ainode, "AINODE"),
    "storescp": (run_storescp, "STORESCP"),
    "orthanc": (run_orthanc, "ORTHANC"),
}


def run_pattern(work: Path, key: str, pattern: Pattern, rounds: int, receivers: list[str]) -> None:
    """Each sender is a modality with its own study; every round sends new SOP Instance UIDs."""
    batches = [
        write_series(work / key / f"sender{index}", pattern.instances, source=pattern.source)
        for index in range(pattern.senders)
    ]
    count = pattern.senders * pattern.instances
    megabytes = sum(p.stat().st_size for batch in batches for p in batch) / 1e6
    print(f"\n== {pattern.name}: {count} instances, {megabytes:.0f} MB")
    rates: dict[str, list[float]] = {name: [] for name in receivers}
    cpu_ms: dict[str, list[float]] = {name: [] for name in receivers}
    peaks: list[int] = []
    for round_ in range(1, rounds + 1):
        for name in receivers:
            runner, called = RECEIVERS[name]
            for batch in batches:
                fresh_uids(batch)
            folder = work / f"{key}-{name}-{round_}"
            folder.mkdir()
            with runner(folder) as (port, pid):
                sending = functools.partial(send_at_once, port, called, batches)
                measured = peak_rss_during(pid, sending)
            seconds = measured.seconds
            if name == "ainode":
                peaks.append(measured.peak)
            rates[name].append(count / seconds)
            cpu_ms[name].append(measured.cpu_ms_per_instance(count))
            print(
                f"round {round_} {name:9s} {count / seconds:8.1f} inst/s "
                f"{megabytes / seconds:8.1f} MB/s  peak RSS {measured.peak / 2**20:5.0f} MiB  "
                f"{measured.per_instance(count)}"
            )
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"median over {rounds} rounds:")
    for name, rate in medians.items():
        print(
            f"  {name:9s} {rate:8.1f} inst/s {rate * megabytes / count:8.1f} MB/s  "
            f"CPU {statistics.median(cpu_ms[name]):5.2f} ms/inst"
        )
    for peer in ("orthanc", "storescp"):
        if "ainode" in medians and peer in medians:
            print(f"  ainode / {peer:8s} = {medians['ainode'] / medians[peer]:.2f}")
    if peaks:
        print(f"  ainode peak RSS {max(peaks) / 2**20:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patterns", default="single,concurrent,small", help=f"of {','.join(PATTERNS)}")
    parser.add_argument("--receivers", default="ainode,storescp,orthanc", help=f"of {','.join(RECEIVERS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--big-gb", type=float, default=2.0, help="0 skips the RSS run")
    args = parser.parse_args()
    receivers = [name for name in args.receivers.split(",") if name]
    for name in receivers:
        if name not in RECEIVERS:
            parser.error(f"--receivers: unknown receiver {name!r}")

    with tempfile.TemporaryDirectory(prefix="ainode-bench-") as tmp:
        work = Path(tmp)
        for key in filter(None, args.patterns.split(",")):
            if key not in PATTERNS:
                parser.error(f"--patterns: unknown pattern {key!r}")
            run_pattern(work, key, PATTERNS[key], args.rounds, receivers)

        if args.big_gb > 0:
            big = write_big_study(work / "big", args.big_gb)
            total = sum(p.stat().st_size for p in big) / 2**30
            folder = work / "ainode-big"
            folder.mkdir()
            senders = min(10, len(big))
            with run_ainode(folder) as (port, pid):
                measured = peak_rss_during(
                    pid,
                    lambda: send_at_once(port, "AINODE", [big[i::senders] for i in range(senders)]),
                    RSS_RUN_SAMPLE_SECONDS,
                )
            print(
                f"\nbig: {len(big)} instances of 256 MiB, {total:.2f} GiB over {senders} associations "
                f"in {measured.seconds:.1f} s; ainode peak RSS {measured.peak / 2**20:.0f} MiB"
            )


if __name__ == "__main__":
    main()
