"""One process commits what every receiving process stored: the commit process.

With several receiving processes (:mod:`scp.receivers`), each ran its own group commit, and the
batches of the two queued on SQLite's one write lock: a leader waited for the other process's
batch (its busy handler sleeping 1, 2, 5 ms ... between tries), then ran its statements in an
interpreter whose lock the association threads of its process wanted too, so the database was
held for the whole time the leader waited for that lock. Measured with ten storescu at once
(512x512 CT): the database was held about three quarters of the time, and each instance waited
15 ms for its commit.

Here the main process forks one more process before the receivers: it opens the database, and
its one thread commits the batches of every receiving process (:class:`CommitLoop`, with
:class:`storage.group_commit.GroupCommitter`'s batch: each folder's fsync once, every row in one
transaction, one WAL sync). A receiving process hands it an instance whose bytes are durable and
waits for the answer (:class:`RemoteCommitter`, the same ``record`` as the group commit's).

The links are Unix socket pairs made before the fork, one per client process (the main process
and each receiver), so nothing outside the node can reach the commit process. Over its link a
client passes the commit process one end of a new socket pair (``SCM_RIGHTS``) for each request
in flight at once: a thread sends its request and waits on its own channel, with no thread in
between to hand the answer on. Requests and answers are pickles (our own processes at both ends).

One unit with the node: the commit process dies with the main process (``PR_SET_PDEATHSIG``),
ignores SIGTERM and SIGINT (a stop signal to the node's process group must not end it while the
receivers finish their open associations), and exits once every client has closed its link; if
it exits on its own, the node stops with its exit status (:class:`scp.receivers.ReceiverWatch`),
and every C-STORE waiting for it is answered 0xA700.
"""

from __future__ import annotations

import logging
import pickle
import resource
import selectors
import signal
import socket
import struct
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from storage.db import open_database
from storage.errors import DiskFull, StorageUnavailable
from storage.group_commit import GroupCommitter, wait_for_durable_bytes
from storage.models import utc_now
from storage.studies import IngestResult, ReceivedInstance

log = logging.getLogger("ainode.storage")
_LENGTH = struct.Struct("!I")
MAX_MESSAGE_BYTES = 16 << 20  # a request carries one instance's header index: far below this
# What went wrong, as the commit process tells the client: the class raised there
_ERRORS: dict[str, type[Exception]] = {"disk_full": DiskFull, "unavailable": StorageUnavailable}


class CommitRefused(Exception):
    """The database refused this instance's row (a value it cannot hold, say): answered 0x0110.
    ``cause``: the name of the error the commit process got (its log has the rest)."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


@dataclass
class CommitLinks:
    """The socket pairs between the commit process (``serving``) and each client process
    (``clients``: index 0 the main process, then one per receiver), made before any fork."""

    serving: list[socket.socket]
    clients: list[socket.socket]

    @classmethod
    def make(cls, clients: int) -> CommitLinks:
        if clients < 1:
            raise ValueError(f"Argument 'clients' must be at least 1, got {clients!r}")
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(clients)]
        return cls(serving=[pair[0] for pair in pairs], clients=[pair[1] for pair in pairs])

    def keep_serving(self) -> list[socket.socket]:
        """In the commit process: close every client's end; the serving ends."""
        for link in self.clients:
            link.close()
        return self.serving

    def keep_client(self, index: int) -> socket.socket:
        """In client ``index``'s process: close every other end; its own link. The commit
        process sees a client's link end only once every process holding it has closed it."""
        for link in self.serving:
            link.close()
        for other, link in enumerate(self.clients):
            if other != index:
                link.close()
        return self.clients[index]


def _send(channel: socket.socket, message: object) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    channel.sendall(_LENGTH.pack(len(payload)) + payload)


def _receive(channel: socket.socket) -> object:
    """One message; ConnectionError when the other end closed."""
    (length,) = _LENGTH.unpack(_read_exactly(channel, _LENGTH.size))
    if length > MAX_MESSAGE_BYTES:
        raise ConnectionError(f"a commit message of {length} bytes is over {MAX_MESSAGE_BYTES}")
    return pickle.loads(_read_exactly(channel, length))


def _read_exactly(channel: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = channel.recv(count - len(data))
        if not chunk:
            raise ConnectionError("the other end closed the commit channel")
        data += chunk
    return bytes(data)


def _answer(outcome: IngestResult | BaseException) -> tuple[str, object]:
    """The answer for one request: ("ok", result) or (error kind, message)."""
    if isinstance(outcome, IngestResult):
        return "ok", outcome
    if isinstance(outcome, DiskFull):
        return "disk_full", str(outcome)
    if isinstance(outcome, StorageUnavailable):
        return "unavailable", str(outcome)
    return "refused", type(outcome).__name__


class CommitLoop:
    """The commit process's one thread: reads every request waiting, commits them as one batch,
    answers each, again; until every client link has closed."""

    def __init__(self, committer: GroupCommitter, links: list[socket.socket]) -> None:
        self.committer = committer
        self._selector = selectors.DefaultSelector()
        self._links = set(links)
        for link in links:
            self._selector.register(link, selectors.EVENT_READ)

    def run(self) -> None:
        try:
            while self._links:
                waiting: list[tuple[socket.socket, ReceivedInstance, Path | None]] = []
                for key, _ in self._selector.select():
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    if sock in self._links:
                        self._take_channels(sock)
                    else:
                        request = self._read_request(sock)
                        if request is not None:
                            waiting.append((sock, *request))
                if waiting:
                    self._commit(waiting)
        finally:
            self._selector.close()

    def _take_channels(self, link: socket.socket) -> None:
        """A new channel from a client (or its link closed: that client process has ended)."""
        try:
            data, fds, _flags, _address = socket.recv_fds(link, 1, 1)
        except OSError:
            data, fds = b"", []
        for fd in fds:
            channel = socket.socket(fileno=fd)
            self._selector.register(channel, selectors.EVENT_READ)
        if not data:
            self._drop(link)
            self._links.discard(link)

    def _read_request(self, channel: socket.socket) -> tuple[ReceivedInstance, Path | None] | None:
        try:
            message = _receive(channel)
        except (OSError, ConnectionError):
            self._drop(channel)  # its thread ended, or its process did
            return None
        except Exception:  # not a pickle (only our own processes hold a channel: a defect)
            log.exception("a commit request could not be read: closing its channel")
            self._drop(channel)
            return None
        match message:
            case (ReceivedInstance() as instance, str() | None as folder):
                return instance, None if folder is None else Path(folder)
        log.error("a commit request of type %s is not (instance, folder): closing its channel", type(message))
        self._drop(channel)
        return None

    def _commit(self, waiting: list[tuple[socket.socket, ReceivedInstance, Path | None]]) -> None:
        outcomes = self.committer.commit_together([(instance, folder) for _, instance, folder in waiting])
        for (channel, instance, _), outcome in zip(waiting, outcomes, strict=True):
            if not isinstance(outcome, (IngestResult, StorageUnavailable)):
                log.error(
                    "the database refused the row of %s: %s",
                    instance.sop_instance_uid,
                    type(outcome).__name__,
                    exc_info=outcome,
                )
            try:
                _send(channel, _answer(outcome))
            except OSError:
                self._drop(channel)  # the waiting thread is gone; its association has ended

    def _drop(self, sock: socket.socket) -> None:
        self._selector.unregister(sock)
        sock.close()


def _allow_a_descriptor_per_channel() -> None:
    """Raise the soft limit on open files to the hard one: the commit process holds a channel
    for every store in flight on every receiver (receivers x ``node.max_associations`` at
    most), more than a soft limit of 1024 allows on a large host."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("the commit process keeps its limit of %d open files: %s", soft, exc)


def run_commit_process(links: list[socket.socket], database_url: str, settle_seconds: float) -> int:
    """The commit process's body (forked; see the module's docstring)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _allow_a_descriptor_per_channel()
    with open_database(database_url) as sessions:
        CommitLoop(GroupCommitter(sessions, settle_seconds, utc_now), links).run()
    return 0


class RemoteCommitter:
    """A client's :meth:`record`: the same contract as
    :meth:`storage.group_commit.GroupCommitter.record`, answered by the commit process."""

    def __init__(self, link: socket.socket) -> None:
        self.link = link
        self._link_lock = threading.Lock()
        self._idle: list[socket.socket] = []  # channels no thread is waiting on
        self._idle_lock = threading.Lock()

    def record(
        self, instance: ReceivedInstance, folder: Path | None, durable: Future[None] | None = None
    ) -> IngestResult:
        """Commit ``instance`` (its file's ``folder`` fsynced first) once ``durable`` (its bytes'
        fsync) has succeeded; returns once the commit process has committed it. Raises
        :class:`StorageUnavailable` (:class:`DiskFull`) when the disk, the database or the
        commit process cannot take it, :class:`CommitRefused` when the database refused it."""
        wait_for_durable_bytes(durable)
        channel = self._channel()
        try:
            _send(channel, (instance, None if folder is None else str(folder)))
            answer = _receive(channel)
        except (OSError, ConnectionError) as exc:
            channel.close()
            raise StorageUnavailable(f"the commit process did not answer: {exc}") from exc
        with self._idle_lock:
            self._idle.append(channel)
        match answer:
            case ("ok", IngestResult() as result):
                return result
            case (str() as kind, str() as message) if kind in _ERRORS:
                raise _ERRORS[kind](message)
            case ("refused", str() as cause):
                raise CommitRefused(cause)
        raise StorageUnavailable(f"the commit process answered {type(answer).__name__}, not a result")

    def _channel(self) -> socket.socket:
        with self._idle_lock:
            if self._idle:
                return self._idle.pop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._link_lock:
                socket.send_fds(self.link, [b"+"], [theirs.fileno()])
        except OSError as exc:
            ours.close()
            raise StorageUnavailable(f"the commit process is gone: {exc.strerror}") from exc
        finally:
            theirs.close()
        return ours

    def close(self) -> None:
        """Close the link and every idle channel: the commit process exits once every
        client has."""
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for channel in idle:
            channel.close()
        self.link.close()
