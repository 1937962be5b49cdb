"""More than one process receiving DICOM on one port, so parsing and hashing are not serialised by
one interpreter's lock.

``node.receiver_processes`` processes listen on the node's port, each with its own socket bound
with ``SO_REUSEPORT``: the kernel spreads new associations over them. The node's main process is
one of them; the others are forked from it before it starts any thread, and each runs only the
storage SCP (its own database engine and group commit, and the "still sending" heartbeat of the
associations it holds). Settling, reaping and everything else stay in the main process.

One unit, as one process was:
- a receiver dies with the main process (``PR_SET_PDEATHSIG``: SIGKILL), so ``kill -9`` of the
  node leaves nothing listening;
- a receiver that exits on its own (a crash) stops the node with the receiver's exit status, so
  the service manager restarts the node whole (what was acknowledged is durable; what was not,
  the modality sends again);
- SIGTERM stops every receiver and the main process's roles at once: none accepts another
  association, each lets its open ones finish within the grace period.

Before any socket takes ``SO_REUSEPORT``, the main process binds the port without it: another
node already listening there makes that fail ("address in use"), rather than two nodes silently
sharing one port.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from conf import Settings
from storage.commit_process import CommitLinks, run_commit_process
from storage.db import open_database

log = logging.getLogger("ainode.scp")
PR_SET_PDEATHSIG = 1


def receiver_count(settings: Settings, cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The configured count; 0 means one per CPU this process may use: the cores it may run
    on, and no more than a container's CPU quota (cgroup v2 ``cpu.max``) allows."""
    configured = settings.node.receiver_processes
    if configured:
        return configured
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no cgroup v2 limit to read
    return max(1, cores)


def check_port_free(host: str, port: int, patience_seconds: float = 3.0) -> None:
    """Raise OSError (EADDRINUSE) when anything listens on ``host:port``, even a socket with
    SO_REUSEPORT set: a bind without it cannot share the port. Tries for ``patience_seconds``:
    the receivers of a node killed just before are still exiting."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    deadline = time.monotonic() + patience_seconds
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT is no listener
            try:
                probe.bind((host, port))
                return
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
        if time.monotonic() > deadline:
            raise OSError(errno.EADDRINUSE, f"node.port {port} on {host} is in use by another process")
        time.sleep(0.1)


def _die_with_parent(parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _run_receiver(settings: Settings, index: int, links: CommitLinks) -> int:
    from scp.server import StorageSCP  # the fork happens before this module's import is needed

    commit_link = links.keep_client(index)

    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with open_database(settings.storage.database_url) as sessions:
        scp = StorageSCP(settings, sessions, settles=False, reuse_port=True, commit_link=commit_link)
        scp.start()
        log.info("receiver %d (pid %d) listening", index, os.getpid())
        stop.wait()
        scp.stop()
    return 0


def _fork(name: str, body: Callable[[], int]) -> int:
    """Fork a process that runs ``body`` and exits with its status, dying with this one; its
    PID here. Call before any thread is started (a forked child has only the thread that
    forked)."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's code
        code = 1
        try:
            _die_with_parent(parent)
            code = body()
        except BaseException:
            log.exception("%s failed", name)
        finally:
            logging.shutdown()
            os._exit(code)
    return pid


def fork_commit_process(settings: Settings, links: CommitLinks) -> int:
    """Fork the commit process (:mod:`storage.commit_process`) before the receivers; its PID."""
    return _fork(
        "the commit process",
        lambda: run_commit_process(
            links.keep_serving(), settings.storage.database_url, settings.study.settle_seconds
        ),
    )


def fork_receivers(settings: Settings, count: int, links: CommitLinks) -> list[int]:
    """Fork ``count - 1`` receivers, receiver ``index`` with ``links.clients[index]``; returns
    their PIDs in the main process. Call before any thread is started."""
    return [
        _fork(f"receiver {index}", functools.partial(_run_receiver, settings, index, links))
        for index in range(1, count)
    ]


class ReceiverWatch:
    """Waits on each receiver in its own thread; one that exits while the node is not stopping
    calls ``on_exit`` with its exit status.

    ``stopping``: set once the node is stopping (its signal handler sets it). A stop signal to
    the node's whole process group (Ctrl-C in a terminal) or cgroup (systemd) reaches the
    receivers too, and they may exit before the main process has stopped its own roles: that is
    the node stopping, not a receiver failing."""

    def __init__(
        self, pids: list[int], on_exit: Callable[[int], None], stopping: threading.Event | None = None
    ) -> None:
        self.pids = pids
        self.on_exit = on_exit
        self.stopping = stopping if stopping is not None else threading.Event()
        # A reaped receiver's PID may be reused by any process: never signal it again.
        self._reaped: set[int] = set()
        self._reaped_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._wait, args=(pid,), name=f"receiver-{pid}", daemon=True)
            for pid in pids
        ]
        for thread in self._threads:
            thread.start()

    def _wait(self, pid: int) -> None:
        try:
            # Wait for the exit without reaping it, then reap under the lock: until then the
            # PID stays the receiver's (a zombie), so a signal sent meanwhile reaches no one else.
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
            with self._reaped_lock:
                self._reaped.add(pid)
                _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            with self._reaped_lock:
                self._reaped.add(pid)
            return
        code = os.waitstatus_to_exitcode(status)
        if not self.stopping.is_set():
            log.error(
                "process %d (a receiver or the commit process) exited with status %d; "
                "stopping the node so that it is restarted whole",
                pid,
                code,
            )
            self.on_exit(code if code > 0 else 1)

    def terminate(self) -> None:
        """SIGTERM every receiver: each stops accepting at once, and finishes its open
        associations while the main process finishes its own."""
        self.stopping.set()
        self._signal(signal.SIGTERM)

    def _signal(self, signum: int) -> None:
        """Send ``signum`` to every receiver not yet reaped (the lock keeps a reap from
        slipping in between the check and the kill)."""
        with self._reaped_lock:
            for pid in self.pids:
                if pid not in self._reaped:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signum)

    def stop(self, timeout: float) -> None:
        """:meth:`terminate`, then wait for every receiver to exit."""
        self.terminate()
        for thread in self._threads:
            thread.join(timeout=timeout)
        stuck = [pid for pid, thread in zip(self.pids, self._threads, strict=True) if thread.is_alive()]
        for pid in stuck:
            log.warning(
                "process %d (a receiver or the commit process) did not stop in %.0f s; killing it",
                pid,
                timeout,
            )
        if stuck:
            self._signal(signal.SIGKILL)
            for thread in self._threads:
                thread.join(timeout=5)
