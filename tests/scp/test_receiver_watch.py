"""scp.receivers.ReceiverWatch with real child processes: an exit is reported once, and a
receiver already reaped is never signalled again (its PID may belong to anyone by then)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from scp.receivers import ReceiverWatch


def _fork(body: Callable[[], int]) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = body()
        finally:
            os._exit(code)
    return pid


def _sleeper() -> int:
    time.sleep(60)
    return 0


def test_an_exit_is_reported_and_the_reaped_pid_never_signalled(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[int, int]] = []
    real_kill = os.kill

    def recording_kill(pid: int, signum: int) -> None:
        sent.append((pid, signum))
        real_kill(pid, signum)

    monkeypatch.setattr(os, "kill", recording_kill)  # scp.receivers calls os.kill
    exiting = _fork(lambda: 7)
    sleeping = _fork(_sleeper)
    reported: list[int] = []
    done = threading.Event()

    def on_exit(code: int) -> None:
        reported.append(code)
        done.set()

    watch = ReceiverWatch([exiting, sleeping], on_exit)
    try:
        assert done.wait(10)
        assert reported == [7]
    finally:
        watch.stop(timeout=10)  # the node stopping after a receiver died; cleans up by PID
    assert (sleeping, signal.SIGTERM) in sent
    assert all(pid != exiting for pid, _ in sent)
    assert reported == [7]  # the stop itself is not a receiver failing


def test_a_receiver_that_ignores_sigterm_is_killed(monkeypatch: pytest.MonkeyPatch) -> None:
    def stubborn() -> int:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)
        return 0

    pid = _fork(stubborn)
    time.sleep(0.2)  # the child has set its handler
    watch = ReceiverWatch([pid], lambda code: None)
    started = time.monotonic()
    watch.stop(timeout=1)
    assert time.monotonic() - started < 10
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)  # reaped by the watch, after SIGKILL
