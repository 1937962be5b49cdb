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

The C-STORE fast path: pynetdicom turns each C-STORE into a dozen pydicom datasets and state
machine steps over two threads (the command decoded into a Dataset, a File Meta Dataset built and
written, the request and response primitives validated by regex, the response encoded through
pydicom, queue hand-offs both ways): about two thirds of the node's CPU per instance. While an
association is established and pynetdicom holds no partial message, the DUL thread reads each
P-DATA-TF PDU itself (:meth:`EventDrivenDUL._take_pdu`): a whole C-STORE-RQ command with a data
set, on an accepted context, is read with :mod:`scp.dimse_codec`; its data set fragments go
straight to a file under the chunked-receive folder after the same File Meta Information
pynetdicom writes, hashed (SHA-256) as they are written; on the last fragment the node's store
handler runs (on this thread: the exchange is synchronous) and the C-STORE-RSP goes out as one
PDU. Everything else (C-ECHO, a command split over fragments, release, abort, a malformed PDU)
goes to pynetdicom's own decoding, unchanged.

The UIDs: pynetdicom builds every UID it decodes through ``set_uid``, which validates it by regex
(pydicom's UID constructor, pynetdicom's validator, the conformance check): an A-ASSOCIATE-RQ from
storescu proposes 128 contexts, and fifty such associations cost more CPU than the instances they
carried. :func:`cache_uid_checks` puts a bounded cache in front of it (the same UIDs recur in every
association); a UID that fails is not cached, so it fails again, logged as before.

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
import importlib
import inspect
import logging
import os
import queue
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import pynetdicom
import pynetdicom.utils
from pynetdicom.association import Association
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.transport import AssociationSocket
from pynetdicom.utils import make_target

from scp.dimse_codec import (
    MAX_COMMAND_BYTES,
    P_DATA_TF,
    PDV,
    CodecError,
    StoreRequest,
    command_pdu,
    file_meta,
    pdvs,
    store_request,
    store_response,
)

log = logging.getLogger("ainode.scp")

# Every wait is this long at most, also while messages flow: no busy polling (a thread that
# wakes every fraction of a millisecond to look asks for the interpreter lock the handler holds,
# and slowed a lone sender: 65 -> 82 small instances/s without it).
MAX_IDLE_WAIT_SECONDS = 0.05
ACCEPTING_WAIT_SECONDS = 10.0  # at most, for the association thread to finish accepting
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
    # the fast path: the PDU read is copied; the File Meta Information, the handler's call and the
    # response follow these two; an unfinished message's file is decode_msg's _data_set_file
    "DULServiceProvider._read_pdu_data": (
        DULServiceProvider._read_pdu_data,
        "19f2d4e38c13c83586365d93dd5cd96a0c7c665cb37251054b3e1f246e9f431b",
    ),
    "DIMSEMessage.decode_msg": (
        DIMSEMessage.decode_msg,
        "f51c777e841a76beeaadfe3015bd4f4a68387229a72f13f3a3b7846d01d72284",
    ),
    "set_uid": (
        pynetdicom.utils.set_uid,
        "f917a8035170f79262606ce81ff903350ae59d272c75d6d15684d9dcde3d178b",
    ),
    "StorageServiceClass.SCP": (
        StorageServiceClass.SCP,
        "63afca7fc6c6e7ee6e6eb303dd6aa72c1e69dbfcb94dd91c9e90ea6d900a4c40",
    ),
}
# The node's store: (association, SOP Class UID, SOP Instance UID, received file, SHA-256 of its
# bytes) -> (status, error comment). It must not raise; it may remove the file.
StoreHandler = Callable[[Association, str, str, Path, str], tuple[int, "str | None"]]
HANDLER_FAILED = 0xC211  # what pynetdicom answers when a C-STORE handler raises


_UPSTREAM_SET_UID = pynetdicom.utils.set_uid
# the modules that imported set_uid by name (pynetdicom 3.0.4)
_SET_UID_USERS = ("ae", "dimse_primitives", "pdu_items", "pdu_primitives", "presentation")


@functools.lru_cache(maxsize=4096)  # bounded: a peer sending fresh UIDs only churns it
def _cached_set_uid(
    value: str | bytes, name: str, allow_empty: bool, allow_none: bool, validate: bool
) -> Any:
    return _UPSTREAM_SET_UID(value, name, allow_empty, allow_none, validate)


def _set_uid(
    value: str | bytes | None,
    name: str,
    allow_empty: bool = True,
    allow_none: bool = True,
    validate: bool = True,
) -> Any:
    """pynetdicom's ``set_uid`` behind a cache; values it cannot key safely go straight to it
    (a UID carrying a private transfer syntax's encoding)."""
    if isinstance(value, (str, bytes)) and not hasattr(value, "_PRIVATE_TS_ENCODING"):
        return _cached_set_uid(value, name, allow_empty, allow_none, validate)
    return _UPSTREAM_SET_UID(value, name, allow_empty, allow_none, validate)


def cache_uid_checks() -> bool:
    """Put the cache in front of pynetdicom's ``set_uid`` in every module that uses it (once;
    not on a pynetdicom these overrides were not written for). Returns whether it is in place."""
    if changed_upstream():
        return False
    for name in _SET_UID_USERS:
        module = importlib.import_module(f"pynetdicom.{name}")
        if getattr(module, "set_uid", None) in (_UPSTREAM_SET_UID, _set_uid):
            module.set_uid = _set_uid  # type: ignore[attr-defined]
    return True


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


@dataclass
class _Receiving:
    """A C-STORE data set arriving on the fast path: its file, and why writing it failed."""

    request: StoreRequest
    context_id: int
    path: Path
    file: IO[bytes] | None
    failed: str | None = None
    failed_status: int = 0xA700  # Out of Resources, unless the request itself was refused
    # of the bytes written, as they are written: the file is not read again to name it
    sha256: Any = field(default_factory=hashlib.sha256)

    def write(self, data: memoryview) -> None:
        if self.file is None:
            return  # writing already failed: the rest is read and dropped
        try:
            self.file.write(data)
        except OSError as exc:
            self.fail(f"cannot write the received data set ({exc.strerror or type(exc).__name__})")
            return
        self.sha256.update(data)

    def fail(self, reason: str, status: int = 0xA700) -> None:
        self.failed, self.failed_status = reason, status
        self.close()

    def close(self) -> None:
        if self.file is not None:
            file, self.file = self.file, None
            try:
                file.close()
            except OSError as exc:
                self.failed = self.failed or f"cannot write the received data set ({exc.strerror})"

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class EventDrivenDUL(DULServiceProvider):  # type: ignore[misc]
    """pynetdicom's DUL with its idle sleep replaced by a wait on the socket and a wake-up pair.

    Not constructed: :func:`install` converts the association's DUL before its thread starts."""

    _wake_reader: socket.socket
    _wake_writer: socket.socket
    _user_wake: threading.Event
    _fast_store: StoreHandler | None
    _tmp_dir: Path | None
    _receiving: _Receiving | None
    _spare: tuple[int, str] | None
    fast_stores: int

    def _convert(
        self, user_wake: threading.Event, fast_store: StoreHandler | None = None, tmp_dir: Path | None = None
    ) -> None:
        self._fast_store = fast_store
        self._tmp_dir = tmp_dir
        self._receiving = None
        self._spare = None  # the next data set's file, made while the peer was not waiting
        self.fast_stores = 0  # C-STOREs this association served on the fast path
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

    # -- the C-STORE fast path ------------------------------------------------------------------

    def _is_transport_event(self) -> bool:
        """pynetdicom's, with each PDU read whole and offered to :meth:`_take_pdu` while the
        association is established (Sta6)."""
        if self._fast_store is None or self.state_machine.current_state != "Sta6":
            return bool(super()._is_transport_event())
        if not (self.socket and self.socket.ready):
            return False
        pdu = self._read_pdu()
        if pdu is not None:
            self._take_pdu(pdu)
        return True

    def _read_pdu(self) -> bytearray | None:
        """pynetdicom 3.0's ``_read_pdu_data`` up to the decode: the whole PDU, or None once the
        event that ends the association (Evt17, Evt19) is queued."""
        socket_ = cast(AssociationSocket, self.socket)
        try:
            bytestream = bytearray(socket_.recv(6))
        except (OSError, TimeoutError):
            log.error("the connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return None
        try:
            pdu_type, _, pdu_length = struct.unpack(">BBL", bytestream)
        except struct.error:
            self.event_queue.put("Evt17")
            return None
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            log.error("unknown PDU type 0x%02X received", pdu_type)
            self.event_queue.put("Evt19")
            return None
        try:
            bytestream += socket_.recv(pdu_length)
        except (OSError, TimeoutError):
            log.error("the connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return None
        if len(bytestream) != 6 + pdu_length:
            log.error(
                "the received PDU is shorter than its length (%d of %d bytes)",
                len(bytestream),
                6 + pdu_length,
            )
            self.event_queue.put("Evt17")
            return None
        return bytestream

    def _to_pynetdicom(self, pdu: bytes | bytearray) -> None:
        """pynetdicom 3.0's ``_read_pdu_data`` from the decode on: queue the PDU's event."""
        try:
            decoded, event = self._decode_pdu(bytearray(pdu))
        except Exception as exc:
            log.error("unable to decode a received PDU (%s)", type(exc).__name__)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _take_pdu(self, pdu: bytearray) -> None:
        """Serve the P-DATA-TF items of ``pdu`` that belong to a fast-path C-STORE; hand the
        PDU (or its items from the first that does not) to pynetdicom."""
        if pdu[0] != P_DATA_TF:
            if self._receiving is not None:  # a release or abort mid data set
                self._receiving.discard()
                self._receiving = None
            self._to_pynetdicom(pdu)
            return
        try:
            items = list(pdvs(pdu))
        except CodecError as exc:
            log.error("malformed P-DATA-TF PDU (%s): aborting the association", exc)
            self._abort_fast()
            return
        for index, item in enumerate(items):
            receiving = self._receiving
            if receiving is None:
                request = self._fast_request(item)
                if request is None:
                    self._to_pynetdicom(pdu if index == 0 else _p_data_tf(items[index:]))
                    return
                self._receiving = self._open_receiving(request, item.context_id)
                continue
            if item.is_command or item.context_id != receiving.context_id:
                log.error("a C-STORE data set was interrupted by another message: aborting the association")
                self._abort_fast()
                return
            receiving.write(item.data)
            if item.is_last:
                self._receiving = None
                self._finish(receiving)

    def _fast_request(self, item: PDV) -> StoreRequest | None:
        """The C-STORE-RQ ``item`` holds whole, when the fast path can serve it."""
        assoc = self.assoc
        if not (item.is_command and item.is_last) or len(item.data) > MAX_COMMAND_BYTES:
            return None
        if assoc.dimse.message is not None or not self._accepted() or assoc._sent_release:
            return None
        if item.context_id not in assoc._accepted_cx:
            return None  # pynetdicom aborts it
        try:
            return store_request(item.data)
        except CodecError:
            return None  # pynetdicom answers or aborts as it does

    def _accepted(self) -> bool:
        """Whether the association thread has finished accepting: waits for it when this
        thread is first. The A-ASSOCIATE-AC goes out before pynetdicom runs EVT_ACCEPTED's
        handlers and sets ``is_established``, so a quick peer's first C-STORE can arrive in
        between; pynetdicom's own path holds it until then, and so does this one (the server
        opens its record of the association in EVT_ACCEPTED). The network timeout is held off
        meanwhile, as in :meth:`_finish` (the PDU the peer sent is not counted as activity until
        it is served, and the association thread looks at the timer as soon as accepting ends)."""
        assoc = self.assoc
        if assoc.is_established:
            return True
        with self._peer_waits_for_us():
            deadline = time.monotonic() + ACCEPTING_WAIT_SECONDS
            while not assoc.is_established:
                if assoc._kill or assoc.is_aborted or time.monotonic() > deadline:
                    return False
                time.sleep(0.001)
            return True

    @contextlib.contextmanager
    def _peer_waits_for_us(self) -> Iterator[None]:
        """The network timeout held off, and restarted after: the peer is waiting for us, not
        idle."""
        timeout = self._idle_timer.timeout
        self._idle_timer.timeout = None
        try:
            yield
        finally:
            self._idle_timer.restart()  # before the timeout returns: never seen expired
            self._idle_timer.timeout = timeout

    def _open_receiving(self, request: StoreRequest, context_id: int) -> _Receiving:
        context = self.assoc._accepted_cx[context_id]
        if self._spare is not None:
            (fd, name), self._spare = self._spare, None
        else:
            fd, name = self._new_file()
        receiving = _Receiving(request, context_id, Path(name), os.fdopen(fd, "wb"))
        if request.sop_class_uid != str(context.abstract_syntax):
            # the data set is read and dropped; the association goes on
            receiving.fail(
                f"SOP Class {request.sop_class_uid[:64]!r} was not negotiated on presentation "
                f"context {context_id}",
                0x0122,  # Refused: SOP Class not supported
            )
            return receiving
        try:
            header = file_meta(
                request.sop_class_uid, request.sop_instance_uid, str(context.transfer_syntax[0])
            )
        except UnicodeEncodeError:
            receiving.fail("the request's UIDs are not ASCII", 0xC000)
            return receiving
        receiving.write(memoryview(header))
        return receiving

    def _finish(self, receiving: _Receiving) -> None:
        """Store the complete data set and answer, with the network timeout held off while the
        handler runs (the peer is waiting for our answer, not idle)."""
        receiving.close()
        request = receiving.request
        status: int
        comment: str | None
        if receiving.failed is not None:
            status, comment = receiving.failed_status, receiving.failed
            log.error("C-STORE answered 0x%04X: %s", status, receiving.failed)
        else:
            with self._peer_waits_for_us():
                try:
                    store = cast(StoreHandler, self._fast_store)
                    status, comment = store(
                        self.assoc,
                        request.sop_class_uid,
                        request.sop_instance_uid,
                        receiving.path,
                        receiving.sha256.hexdigest(),
                    )
                except Exception:
                    log.exception("the C-STORE handler raised")
                    status, comment = HANDLER_FAILED, None
        receiving.discard()
        self.fast_stores += 1
        if self.assoc.is_established and self.socket is not None:
            response = store_response(request, status, comment)
            self.socket.send(
                command_pdu(receiving.context_id, response, self.assoc.requestor.maximum_length or 0)
            )
            self._make_spare()

    def _make_spare(self) -> None:
        """Make the next data set's file now, while the peer reads its answer and sends the
        next request: creating a file waits for the file system's journal, which the fsyncs of
        the instance just stored keep busy (0.6 ms a file, measured: a sixth of a lone
        sender's time per 512 KB instance when it was on the way of each request)."""
        try:
            self._spare = self._new_file()
        except OSError:
            self._spare = None  # the next request makes its own, and reports what fails

    def _new_file(self) -> tuple[int, str]:
        """A new file to receive a data set into, under the chunked-receive folder."""
        return tempfile.mkstemp(suffix=".dcm", dir=self._tmp_dir)

    def _drop_spare(self) -> None:
        if self._spare is not None:
            (fd, name), self._spare = self._spare, None
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name)

    def _abort_fast(self) -> None:
        if self._receiving is not None:
            self._receiving.discard()
            self._receiving = None
        self.event_queue.put("Evt19")  # AA-8: A-ABORT to the peer, close

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
            if self._receiving is not None:  # the association ended mid data set
                self._receiving.discard()
                self._receiving = None
            self._drop_spare()
            _discard_partial(self.assoc.dimse.message)
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


def _discard_partial(message: DIMSEMessage | None) -> None:
    """Close and remove the file pynetdicom was receiving a C-STORE data set into when the
    association ended before its last fragment (``decode_msg`` leaves it in tmp/, open)."""
    file = getattr(message, "_data_set_file", None)
    if file is None:
        return
    with contextlib.suppress(OSError):
        file.close()
    with contextlib.suppress(OSError):
        os.unlink(file.name)


def _p_data_tf(items: Sequence[PDV]) -> bytes:
    body = b"".join(struct.pack(">LBB", len(i.data) + 2, i.context_id, i.control) + i.data for i in items)
    return struct.pack(">BBL", P_DATA_TF, 0, len(body)) + body


def install(assoc: Association, fast_store: StoreHandler | None = None, tmp_dir: Path | None = None) -> bool:
    """Convert a new acceptor association (created, its threads not started) to the bulk receive
    and the event-driven reactors, with the C-STORE fast path when ``fast_store`` is given (data
    sets received into ``tmp_dir``). Returns False, leaving pynetdicom's own, on a pynetdicom
    these were not written for."""
    if changed_upstream():
        return False
    # Same objects, converted in place: re-creating the DUL would queue a second Evt5.
    assoc.dul.socket.__class__ = BulkReceiveSocket
    signal = threading.Event()
    assoc.dul.__class__ = EventDrivenDUL
    cast(EventDrivenDUL, assoc.dul)._convert(signal, fast_store, tmp_dir)
    assoc.__class__ = EventDrivenAssociation
    cast(EventDrivenAssociation, assoc)._dul_signal = signal
    return True
