"""The commit process's protocol (storage/commit_process.py) over real Unix socket pairs, its loop
in a thread here (tests/integration/test_receivers.py runs it as the node's own process): what
several client processes hand in is committed in shared batches, each thread gets its own
instance's result or error, and a broken client or commit process costs only what it held."""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import signal
import socket
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from storage import commit_process
from storage.commit_process import (
    CommitLinks,
    CommitLoop,
    CommitRefused,
    RemoteCommitter,
    run_commit_process,
)
from storage.errors import DiskFull, StorageUnavailable
from storage.group_commit import GroupCommitter
from storage.models import Instance, utc_now
from storage.studies import IngestOutcome, IngestResult, ReceivedInstance
from tests.storage.test_group_commit import at_once
from tests.storage.test_queue import instance

CLIENTS = 2
THREADS_PER_CLIENT = 12


@dataclasses.dataclass
class Running:
    loop: CommitLoop
    thread: threading.Thread
    clients: list[RemoteCommitter]


@pytest.fixture
def running(sessions: sessionmaker[Session]) -> Iterator[Running]:
    links = CommitLinks.make(CLIENTS)
    loop = CommitLoop(GroupCommitter(sessions, 10.0, utc_now), links.serving)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    clients = [RemoteCommitter(link) for link in links.clients]
    yield Running(loop, thread, clients)
    for client in clients:
        client.close()
    thread.join(timeout=10)
    assert not thread.is_alive(), "the commit loop did not end once every client closed its link"


def record_from_threads(
    jobs: list[tuple[RemoteCommitter, ReceivedInstance]], folder: Path | None
) -> list[object]:
    return at_once([functools.partial(client.record, item, folder) for client, item in jobs])


def test_instances_from_several_processes_share_batches_and_each_gets_its_own_result(
    running: Running, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    items = [instance(f"1.{i}", sha=f"{i:064x}") for i in range(CLIENTS * THREADS_PER_CLIENT)]
    jobs = [(running.clients[i % CLIENTS], item) for i, item in enumerate(items)]
    jobs.append((running.clients[1], instance("1.0", sha=f"{0:064x}")))  # a resend: a duplicate
    outcomes = record_from_threads(jobs, tmp_path)
    assert all(isinstance(o, IngestResult) for o in outcomes), outcomes
    results = [o.outcome for o in outcomes if isinstance(o, IngestResult)]
    assert results.count(IngestOutcome.STORED) == len(items)
    assert results.count(IngestOutcome.DUPLICATE) == 1
    stats = running.loop.committer.stats
    assert stats.instances == len(jobs) and stats.batches < len(jobs) and stats.largest > 1
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == len(items)
    # A thread's channel is used again for its next instance, not one per instance.
    again = running.clients[0].record(instance("1.999", sha="e" * 64), tmp_path)
    assert again.outcome is IngestOutcome.STORED


def test_a_row_the_database_refuses_fails_only_its_own_store(
    running: Running, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    good = [instance(f"2.{i}", sha=f"{i:064x}") for i in range(6)]
    bad = dataclasses.replace(instance("2.99", sha="f" * 64), sop_class_uid=None)  # type: ignore[arg-type]
    jobs = [(running.clients[i % CLIENTS], item) for i, item in enumerate([*good, bad])]
    outcomes = record_from_threads(jobs, tmp_path)
    assert all(isinstance(o, IngestResult) and o.outcome is IngestOutcome.STORED for o in outcomes[:-1])
    refused = outcomes[-1]
    assert isinstance(refused, CommitRefused) and refused.cause == "IntegrityError", refused
    with sessions() as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid)))
    assert stored == {item.sop_instance_uid for item in good}


def test_a_folder_or_bytes_that_cannot_be_synced_is_storage_unavailable(
    running: Running, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    client = running.clients[0]
    with pytest.raises(StorageUnavailable, match="cannot sync"):
        client.record(instance("3.1"), tmp_path / "gone")
    failed: Future[None] = Future()
    failed.set_exception(OSError(5, "Input/output error"))
    with pytest.raises(StorageUnavailable, match="cannot sync a received file: Input/output error"):
        client.record(instance("3.2"), tmp_path, failed)
    full: Future[None] = Future()
    full.set_exception(DiskFull("no space left writing under '/data'"))
    with pytest.raises(DiskFull, match="no space left"):
        client.record(instance("3.3"), tmp_path, full)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 0
    assert client.record(instance("3.4"), tmp_path).outcome is IngestOutcome.STORED


def _new_channel(client: RemoteCommitter) -> socket.socket:
    """A channel to the commit process made by hand, as RemoteCommitter makes one: our end."""
    ours, theirs = socket.socketpair()
    socket.send_fds(client.link, [b"+"], [theirs.fileno()])
    theirs.close()
    return ours


def _closed_by_the_other_end(channel: socket.socket) -> bool:
    channel.settimeout(10)
    try:
        return channel.recv(1) == b""
    except ConnectionResetError:  # closed with our request unread
        return True


def test_garbage_on_a_channel_closes_that_channel_only(running: Running, tmp_path: Path) -> None:
    ours = _new_channel(running.clients[1])
    ours.sendall(struct.pack("!I", 5) + b"\x80\x05junk")  # not a pickle of a request
    assert _closed_by_the_other_end(ours)
    ours.close()
    oversized = _new_channel(running.clients[1])
    oversized.sendall(struct.pack("!I", 1 << 31))  # a length no request has
    assert _closed_by_the_other_end(oversized)
    oversized.close()
    assert running.clients[1].record(instance("4.1"), tmp_path).outcome is IngestOutcome.STORED


def _fork_commit_process(links: CommitLinks, sessions: sessionmaker[Session]) -> int:
    """The commit process, forked as the node forks it, on the test's database; its PID."""
    url = sessions.kw["bind"].url.render_as_string(hide_password=False)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = run_commit_process(links.keep_serving(), url, 10.0)
        finally:
            os._exit(code)
    return pid


def test_a_client_whose_commit_process_is_gone_gets_storage_unavailable(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    links = CommitLinks.make(1)
    pid = _fork_commit_process(links, sessions)
    client = RemoteCommitter(links.keep_client(0))
    try:
        assert client.record(instance("5.1"), tmp_path).outcome is IngestOutcome.STORED
        os.kill(pid, signal.SIGTERM)  # ignored: a stop signal to the node's group
        assert client.record(instance("5.2"), tmp_path).outcome is IngestOutcome.STORED
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pid = 0
        with pytest.raises(StorageUnavailable, match="commit process"):
            client.record(instance("5.3"), tmp_path)  # on its idle channel
        with pytest.raises(StorageUnavailable, match="commit process is gone"):
            client.record(instance("5.4"), tmp_path)  # a new channel, over the link
    finally:
        client.close()
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_the_commit_process_exits_once_every_client_has_closed_its_link(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    links = CommitLinks.make(2)
    pid = _fork_commit_process(links, sessions)
    for link in links.serving:
        link.close()
    first, second = (RemoteCommitter(link) for link in links.clients)
    try:
        assert first.record(instance("6.1"), tmp_path).outcome is IngestOutcome.STORED
        first.close()
        assert second.record(instance("6.2"), tmp_path).outcome is IngestOutcome.STORED
        assert os.waitpid(pid, os.WNOHANG) == (0, 0)  # still serving the second
        second.close()
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_the_commit_process_may_hold_a_channel_for_every_store_in_flight() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit on open files here is {hard}")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # a process of its own: the limit is per process
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
            commit_process._allow_a_descriptor_per_channel()
            os.write(write, str(resource.getrlimit(resource.RLIMIT_NOFILE)[0]).encode())
        finally:
            os._exit(0)
    os.close(write)
    raised = int(os.read(read, 64) or b"0")
    os.close(read)
    os.waitpid(pid, 0)
    assert raised == hard or (hard == resource.RLIM_INFINITY and raised == resource.RLIM_INFINITY)
