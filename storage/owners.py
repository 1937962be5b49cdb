"""Who holds a lease: ``host:pid:incarnation``, so a restarted process can tell its own dead
leases (same host, process gone) from those of live processes and of other hosts.

The incarnation (random, one per process start) matters where PIDs repeat: in a container the
node is PID 1 at every restart, so "is PID 1 alive?" answers yes (it is us) for the leases the
killed incarnation left behind. An owner with our PID but another incarnation is that dead
earlier process. Owners written before incarnations were kept (``host:pid``) are read too.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable

_INCARNATION = uuid.uuid4().hex[:12]


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{_INCARNATION}"


def host_of(owner: str) -> str:
    return owner.partition(":")[0]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def orphaned(owner: str | None, host: str, alive: Callable[[int], bool] = process_alive) -> bool:
    """Whether ``owner`` was a process of ``host`` (this host) that is gone: its PID is not
    running, or it is this process's PID held by an earlier incarnation (PID reused by us)."""
    owner_host, _, rest = (owner or "").partition(":")
    pid_text, _, incarnation = rest.partition(":")
    if owner_host != host or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return incarnation != _INCARNATION
    return not alive(pid)
