"""Who holds a lease: ``host:pid``, so a restarted process can tell its own dead leases (same
host, process gone) from those of live processes and of other hosts."""

from __future__ import annotations

import os
import socket


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def host_of(owner: str) -> str:
    return owner.rpartition(":")[0]


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
