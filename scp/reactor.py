"""Our overrides of pynetdicom's internals, all of them: event-driven reactors for its acceptor
associations, and a socket receive that fills one buffer.

pynetdicom runs two polling loops per association. The DUL thread sleeps ``_run_loop_delay``
(1 ms) whenever a pass found nothing to do, then polls the socket with ``select(..., 0)``; the
association thread sleeps 1 ms before every look at its DIMSE queue. One association pays those
sleeps on every message of a C-STORE exchange; ten associations polling at once keep a core busy
with wake-ups that contend for the GIL. Here both threads instead wait for what they wait for:

- the DUL thread blocks in ``select`` on its socket and on a wake-up socket pair, written whenever
  another thread puts a primitive or an event on its queues, or asks it to stop;
- the association thread blocks on an :class:`threading.Event` the DUL thread sets after every
  state-machine action (a decoded DIMSE message, a release or abort request) and when it ends.

Both waits are capped at :data:`MAX_IDLE_WAIT_SECONDS`, so timers (ARTIM, the network timeout)
and a stop flag set without a wake-up are still seen within that time.

The contexts: pynetdicom deep-copies the server's supported presentation contexts for every
association; with every storage SOP class times every accepted transfer syntax that is thousands
of UID objects, each validated again by regex, about a tenth of all the node's CPU when fifty
modalities each send a few small images. :class:`ContextList` copies only what an association
changes (each context's transfer syntax list).

The receive: pynetdicom appends 4 KiB reads to a bytearray; a 1 MiB P-DATA PDU took 256 calls
and as many copies. :class:`BulkReceiveSocket` fills one buffer with as few calls as the kernel
allows (grown as bytes arrive, never sized by the peer's length field alone).

Each override copies one pynetdicom function and changes only what is said above;
:data:`UPSTREAM_SOURCES` pins the hash of the source of each function copied (pynetdicom 3.0.4),
and :func:`install` leaves an association on pynetdicom's own classes when the installed
pynetdicom's source differs (with one warning), so an upgrade costs speed, never correctness.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import inspect
import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pynetdicom
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import make_target

log = logging.getLogger("ainode.scp")

# Every wait is this long at most, also while messages flow: no busy polling (a thread that
# wakes every fraction of a millisecond to look asks for the interpreter lock the handler holds,
# and slowed a lone sender: 65 -> 82 small instances/s without it).
MAX_IDLE_WAIT_SECONDS = 0.05
FIRST_RECEIVE_BYTES = 1024 * 1024 + 6  # a whole P-DATA PDU at node.max_pdu_bytes' default
# sha256 of the source of each upstream function copied below, as in pynetdicom 3.0.4
UPSTREAM_SOURCES: dict[str, tuple[Callable[..., Any], str]] = {
    "DULServiceProvider.run_reactor": (
        DULServiceProvider.run_reactor,
        "e3a10eb3a0931e4854af33b9496e92d9679522aca26b0e04da8967559b9e2803",
    ),
    "Association._run_reactor": (
        Association._run_reactor,
        "f28838c5559e462a563750cfc9f3790027f4bb7e2223baf42c9f5d682c359dee",
    ),
    # ContextList relies on _transfer_syntax being a context's one mutable attribute
    "PresentationContext.__init__": (
        PresentationContext.__init__,
        "37a8842ac07cd8f364dba03f5f7a59c23a0068341873edd81d367ad0c75596d9",
    ),
    "AssociationSocket.recv": (
        AssociationSocket.recv,
        "6bc20a33b1b7cfe76d4ad4407ca242563bc6206fde4b4e1cf7a2fbb1f11d621d",
    ),
}


def upstream_source_hash(function: Callable[..., Any]) -> str:
    return hashlib.sha256(inspect.getsource(function).encode()).hexdigest()


def changed_sources(sources: dict[str, tuple[Callable[..., Any], str]]) -> tuple[str, ...]:
    """The names in ``sources`` whose function's source does not have the pinned hash (or
    cannot be read)."""
    changed = []
    for name, (function, pinned) in sources.items():
        try:
            same = upstream_source_hash(function) == pinned
        except (OSError, TypeError):
            same = False
        if not same:
            changed.append(name)
    return tuple(changed)


@functools.cache
def changed_upstream() -> tuple[str, ...]:
    """The copied pynetdicom functions that changed upstream; warns once."""
    changed = changed_sources(UPSTREAM_SOURCES)
    if changed:
        log.warning(
            "pynetdicom %s changed %s since these overrides were written; using its own polling "
            "reactors (slower with many associations)",
            pynetdicom.__version__,
            ", ".join(changed),
        )
    return changed


class BulkReceiveSocket(AssociationSocket):  # type: ignore[misc]
    """pynetdicom's socket with a receive that fills one buffer (see the module's docstring)."""

    def recv(self, nr_bytes: int) -> bytearray:
        if self.socket is None:
            return bytearray()
        # ``nr_bytes`` is a PDU's length field, whatever anyone who connects wrote there (up to
        # 4 GiB): the buffer starts at most FIRST_RECEIVE_BYTES and doubles as bytes arrive, so
        # it never holds more than twice what was received.
        buffer = bytearray(min(nr_bytes, FIRST_RECEIVE_BYTES))
        filled = 0
        while filled < nr_bytes:
            if filled == len(buffer):
                buffer.extend(bytes(min(nr_bytes - filled, len(buffer))))
            with memoryview(buffer) as whole, whole[filled:] as free:
                got = self.socket.recv_into(free)
            if got == 0:  # closed: return what arrived, as pynetdicom expects
                del buffer[filled:]
                return buffer
            filled += got
        return buffer


class ContextList(list[PresentationContext]):
    """The server's supported contexts; a deep copy shares the immutable parts (UIDs are str)
    and copies each context and its transfer syntax list."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        if changed_upstream():
            return [copy.deepcopy(context, memo) for context in self]
        copies = []
        for context in self:
            twin = copy.copy(context)
            twin._transfer_syntax = list(context._transfer_syntax)
            copies.append(twin)
        return copies


def reorder_transfer_syntaxes(context: PresentationContext, first: list[str]) -> None:
    """Put the syntaxes of ``first`` that ``context`` supports first, in that order, the rest
    after. Reuses the context's own UID objects: the public setter validates every UID again
    by regex, which cost more than the rest of negotiating a 120-context association."""
    ours = {str(uid): uid for uid in context._transfer_syntax}
    wanted = set(first)
    context._transfer_syntax = [ours[uid] for uid in first if uid in ours] + [
        uid for uid in context._transfer_syntax if str(uid) not in wanted
    ]


class WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``wake`` after every put, so the thread that reads it need not poll."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class EventDrivenDUL(DULServiceProvider):  # type: ignore[misc]
    """pynetdicom's DUL with its idle sleep replaced by a wait on the socket and a wake-up pair.

    Not constructed: :func:`install` converts the association's DUL before its thread starts."""

    _wake_reader: socket.socket
    _wake_writer: socket.socket
    _user_wake: threading.Event

    def _convert(self, user_wake: threading.Event) -> None:
        # pynetdicom made the thread's target from the bound method of the class it was built as
        self._target = make_target(self.run_reactor)
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        self._user_wake = user_wake
        for name in ("event_queue", "to_provider_queue"):
            old: queue.Queue[Any] = getattr(self, name)
            new = WakingQueue(self.wake)
            while True:  # the socket already queued Evt5 (connection open) on the old queue
                try:
                    new.put(old.get(block=False))
                except queue.Empty:
                    break
            setattr(self, name, new)

    def wake(self) -> None:
        with contextlib.suppress(OSError):  # full (a wake-up is pending anyway) or closed
            self._wake_writer.send(b"\0")

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def _wait_for_work(self) -> None:
        """Sleep until the peer sends, another thread queues something, or the cap passes."""
        transport = self.socket.socket if self.socket is not None else None
        if transport is None or transport.fileno() < 0:
            time.sleep(self._run_loop_delay)
            return
        if isinstance(transport, ssl.SSLSocket) and transport.pending():
            return  # bytes already decrypted: select would not see them
        try:
            select.select([transport, self._wake_reader], [], [], MAX_IDLE_WAIT_SECONDS)
        except (OSError, ValueError):
            return  # closed under us: the transport check reports it (Evt17)
        with contextlib.suppress(OSError):  # BlockingIOError once drained
            while self._wake_reader.recv(4096):
                pass

    def run_reactor(self) -> None:
        """pynetdicom 3.0's ``DULServiceProvider.run_reactor``; changed: the idle sleep is
        :meth:`_wait_for_work`, and each state-machine action wakes the association thread."""
        self._idle_timer.start()
        sleep = False
        try:
            while True:
                if not self.assoc._dul_ready.is_set():
                    self.assoc._dul_ready.set()
                    sleep = True

                if sleep:
                    self._wait_for_work()

                if self._kill_thread:
                    break

                if self.artim_timer.expired:
                    self.event_queue.put("Evt18")

                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                except Exception as exc:
                    log.error("pynetdicom DUL failed (%s); aborting the association", type(exc).__name__)
                    abort_pdu = A_ABORT_RQ()
                    abort_pdu.source = 0x02
                    abort_pdu.reason_diagnostic = 0x00
                    if self.socket is not None:
                        self.socket.send(abort_pdu.encode())
                    self.assoc.is_aborted = True
                    self.assoc.is_established = False
                    self.assoc._kill = True
                    self._kill_thread = True
                    return

                try:
                    event = self.event_queue.get(block=False)
                except queue.Empty:
                    sleep = True
                    continue

                self.state_machine.do_action(event)
                self._user_wake.set()
                sleep = False
        finally:
            self._user_wake.set()  # the association thread checks dul.is_alive()
            self._wake_reader.close()
            self._wake_writer.close()


class EventDrivenAssociation(Association):  # type: ignore[misc]
    """pynetdicom's acceptor association with its 1 ms sleep per loop replaced by a wait for the
    DUL thread's signal. Not constructed: :func:`install` converts it before it starts."""

    _dul_signal: threading.Event

    def _run_reactor(self) -> None:
        """pynetdicom 3.0's ``Association._run_reactor``; changed: ``time.sleep(0.001)`` became a
        wait on ``_dul_signal`` (set by the DUL after each action, capped)."""
        self._is_paused = False
        while not self._kill:
            self._dul_signal.wait(MAX_IDLE_WAIT_SECONDS)
            self._dul_signal.clear()

            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
                self._dul_signal.set()  # more may have queued while the handler ran

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                log.debug("association released")
                self.is_released = True
                self.is_established = False
                pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                pynetdicom.evt.trigger(self, pynetdicom.evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()

                self.kill()
                return


def install(assoc: Association) -> bool:
    """Convert a new acceptor association (created, its threads not started) to the bulk receive
    and the event-driven reactors. Returns False, leaving pynetdicom's own, on a pynetdicom these
    were not written for."""
    if changed_upstream():
        return False
    # Same objects, converted in place: re-creating the DUL would queue a second Evt5.
    assoc.dul.socket.__class__ = BulkReceiveSocket
    signal = threading.Event()
    assoc.dul.__class__ = EventDrivenDUL
    cast(EventDrivenDUL, assoc.dul)._convert(signal)
    assoc.__class__ = EventDrivenAssociation
    cast(EventDrivenAssociation, assoc)._dul_signal = signal
    return True
