"""The storage SCP: Verification and every storage SOP class, durable before acknowledged.

For each C-STORE: the dataset is streamed to a file under ``storage.root/tmp`` as the P-DATA
arrives (by the fast path in :mod:`scp.reactor`, or by pynetdicom's ``STORE_RECV_CHUNKED_DATASET``
for what the fast path leaves to it), so memory stays flat for any instance size; the
handler checks that the file is a complete dataset matching the request, fsyncs and renames it
into place, and hands it to the group commit (:mod:`storage.group_commit`: the folder's fsync and
the row, shared with the instances other associations finished meanwhile); only once that commit
returns does it answer 0x0000. It makes no HTTP calls and
decodes no pixels, and never raises into pynetdicom.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import socket
import ssl
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pynetdicom
import pynetdicom.dimse_messages
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from conf import Settings
from scp import reactor, tls
from scp.association_log import AssociationLog
from scp.dataset_check import DatasetLimits, InflateLimits, check_dataset_file
from scp.errors import DatasetCorrupt, DatasetMismatch
from scp.statuses import StoreStatus
from scp.transfer_syntaxes import ACCEPTED_TRANSFER_SYNTAXES
from storage import crashpoints
from storage.commit_process import CommitRefused, RemoteCommitter
from storage.db import transaction
from storage.errors import StorageUnavailable
from storage.files import InstanceStore, is_safe_uid, sha256_of
from storage.group_commit import GroupCommitter
from storage.models import Instance, utc_now
from storage.queue import reap_expired
from storage.studies import (
    IngestOutcome,
    ReceivedInstance,
    extend_settle,
    hold_queued,
    settle_due,
)

log = logging.getLogger("ainode.scp")
Clock = Callable[[], dt.datetime]


def configure_pynetdicom(tmp_dir: Path) -> None:
    """Process-wide pynetdicom settings the node relies on.

    pynetdicom creates the chunked-receive file with ``tempfile.NamedTemporaryFile`` in the
    system temp folder; pointing it at ``storage.root/tmp`` keeps the later rename on one file
    system (atomic, no copy).
    """
    pynetdicom._config.STORE_RECV_CHUNKED_DATASET = True
    pynetdicom._config.LOG_REQUEST_IDENTIFIERS = False  # never log patient identifiers
    pynetdicom._config.LOG_RESPONSE_IDENTIFIERS = False
    # pynetdicom binds handlers that narrate every PDU and DIMSE message at DEBUG level; they
    # cost CPU on every message even with its logger at WARNING.
    pynetdicom._config.LOG_HANDLER_LEVEL = "none"
    pynetdicom.dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[assignment,attr-defined]
        tempfile.NamedTemporaryFile, dir=str(tmp_dir)
    )
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    reactor.cache_uid_checks()


def set_nodelay(sock: socket.socket) -> None:
    """Nagle's algorithm on a DIMSE socket holds each small PDU ~40 ms: ~20 instances/s."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class NodeRequestHandler(RequestHandler):  # type: ignore[misc]
    def _create_association(self) -> Association:
        assoc = super()._create_association()
        server = self.server
        fast_store = getattr(server, "fast_store", None)
        if not reactor.install(assoc, fast_store, getattr(server, "fast_store_tmp", None)):
            # pynetdicom's own reactors sleep this long whenever a loop found nothing to do; at
            # the default 1 ms each C-STORE round trip pays it several times over.
            assoc.dul._run_loop_delay = 0.0002
        return assoc


class NodeServer(ThreadedAssociationServer):  # type: ignore[misc]
    """pynetdicom's threaded server with TCP_NODELAY, a per-peer connection cap, and the TLS
    handshake moved off the accept loop (a client that never finishes it would otherwise block
    every other caller)."""

    max_per_peer: int = 64
    network_timeout: float = 30.0
    reuse_port: bool = False  # several receiving processes share the port (scp.receivers)
    # the node's store for the C-STORE fast path (scp.reactor), and where it receives into
    fast_store: reactor.StoreHandler | None = None
    fast_store_tmp: Path | None = None

    def server_bind(self) -> None:
        if self.reuse_port and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls: ssl.SSLContext | None = self._ssl_context
        self._ssl_context = None  # wrap in the connection's own thread instead
        self._per_peer: Counter[str] = Counter()
        self._peer_lock = threading.Lock()
        self.daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        if self.socket is None:
            raise OSError("the DICOM listener socket is closed")
        client, address = self.socket.accept()
        set_nodelay(client)
        # An accepted socket is blocking whatever the listener's timeout: without this, a peer
        # that stops mid-PDU holds its thread in recv() forever, past every pynetdicom timer.
        client.settimeout(self.network_timeout)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        with self._peer_lock:
            if self._per_peer[host] >= self.max_per_peer:
                log.warning(
                    "refused connection from %s: %d associations already open "
                    "(node.max_associations_per_peer)",
                    host,
                    self._per_peer[host],
                )
                return False
            self._per_peer[host] += 1
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0])
        try:
            if self._tls is not None:
                request.settimeout(self.network_timeout)
                try:
                    request = self._tls.wrap_socket(request, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("TLS handshake with %s failed: %s", host, exc)
                    self.shutdown_request(request)
                    return
            super().process_request_thread(request, client_address)
        finally:
            with self._peer_lock:
                self._per_peer[host] -= 1
                if self._per_peer[host] <= 0:
                    del self._per_peer[host]


def prefer_requestor_transfer_syntaxes(event: evt.Event) -> None:
    """Negotiate the transfer syntax the peer proposed first, not the first of our list.

    pynetdicom's acceptor takes, within a presentation context, the first syntax of *its own*
    list that the peer also proposed. dcmsend proposes [file's syntax, uncompressed ...] in one
    context, so with uncompressed first on our side it would decompress an RLE or JPEG 2000
    file to reach us; with compressed first, a peer offering [uncompressed, JPEG baseline] would
    be made to compress lossily. Following the peer's order stores what it holds, as it holds
    it. Runs on EVT_REQUESTED, before negotiation, on this association's own copy of the
    contexts.
    """
    # pynetdicom keeps one acceptor list per SOP class, so several requested contexts for one
    # class (dcmsend: one per file syntax, each with uncompressed fallbacks) share it: each
    # context's first choice goes before any fallback.
    firsts: dict[str, list[str]] = {}
    fallbacks: dict[str, list[str]] = {}
    for requested in event.assoc.requestor.requested_contexts:
        syntaxes = [str(ts) for ts in requested.transfer_syntax]
        if syntaxes:
            firsts.setdefault(str(requested.abstract_syntax), []).append(syntaxes[0])
            fallbacks.setdefault(str(requested.abstract_syntax), []).extend(syntaxes[1:])
    preference = {
        sop_class: list(dict.fromkeys(first + fallbacks[sop_class])) for sop_class, first in firsts.items()
    }
    for context in event.assoc.acceptor.supported_contexts:
        wanted = preference.get(str(context.abstract_syntax))
        if wanted:
            reactor.reorder_transfer_syntaxes(context, wanted)


def make_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The listener's TLS context (:func:`scp.tls.server_context`: TLS 1.2 at least, BCP 195
    cipher suites, client certificates required with ``node.tls_ca``)."""
    return tls.server_context(settings.node)


def _ending(event: evt.Event) -> str:
    """How an association ended. The peer closing the connection after our A-RELEASE-RP races
    the association thread's EVT_RELEASED: a close in Sta13 (release response sent, waiting for
    the close) that was no abort is the release."""
    if event.event == evt.EVT_RELEASED:
        return "released"
    if event.event == evt.EVT_ABORTED or event.assoc.is_aborted:
        return "aborted"
    if event.assoc.is_released or event.assoc.dul.state_machine.current_state == "Sta13":
        return "released"
    return "closed"


@dataclass
class _OpenAssociation:
    """What an open association has stored so far: its studies' settle is pushed while it is
    open, and its end is logged with the count."""

    studies: set[str] = field(default_factory=set)
    stored: int = 0


class StorageSCP:
    """The node's DICOM listener and the settle loop that queues studies."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        clock: Clock = utc_now,
        waiting_reason: str | None = None,
        settles: bool = True,
        reuse_port: bool = False,
        commit_link: socket.socket | None = None,
    ) -> None:
        """``waiting_reason``: this node cannot analyse (no API key); settled studies are shown
        ``waiting`` with this reason instead of ``queued``. ``settles``: this process settles
        studies and reaps leases (the main process; not a forked receiver). ``reuse_port``:
        other receiving processes listen on the same port (:mod:`scp.receivers`).
        ``commit_link``: this process's link to the commit process, which then commits what it
        stores (:mod:`storage.commit_process`); None: its own group commit does."""
        self.settings = settings
        self.settles = settles
        self.reuse_port = reuse_port
        self.sessions = sessions
        self.clock = clock
        self.waiting_reason = waiting_reason
        self.store = InstanceStore(settings.storage.root)
        self.inflate_limits = InflateLimits(
            max_bytes=settings.node.max_inflated_mb << 20, max_ratio=settings.node.max_inflate_ratio
        )
        self.dataset_limits = DatasetLimits(
            max_sequence_items=settings.node.max_sequence_items,
            max_elements=settings.node.max_data_elements,
            max_frames=settings.node.max_frames,
        )
        self.committer: GroupCommitter | RemoteCommitter = (
            GroupCommitter(sessions, settings.study.settle_seconds, clock)
            if commit_link is None
            else RemoteCommitter(commit_link)
        )
        # fsync is disk time, not CPU: each received file's runs while its dataset is checked
        # and hashed.
        self._byte_syncs = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
        self._open: dict[int, _OpenAssociation] = {}  # by id() of the association
        self.associations = AssociationLog(settings.storage.root)
        self._open_lock = threading.Lock()
        self._stop = threading.Event()
        self._server: NodeServer | None = None
        self._housekeeper: threading.Thread | None = None
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.network_timeout = node.network_timeout_seconds
        ae.acse_timeout = node.acse_timeout_seconds
        ae.dimse_timeout = node.dimse_timeout_seconds
        ae.maximum_pdu_size = node.max_pdu_bytes
        ae.maximum_associations = node.max_associations
        if node.allowed_calling_aets:
            ae.require_calling_aet = list(node.allowed_calling_aets)
        ae.require_called_aet = node.check_called_aet  # a caller must address us by our title
        ae.add_supported_context(Verification, ACCEPTED_TRANSFER_SYNTAXES)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax is not None:
                ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not running")
        return int(self._server.server_address[1])

    def start(self) -> None:
        self.store.prepare(purge=False)  # the folders; tmp/ is purged once the port is ours
        configure_pynetdicom(self.store.tmp_dir)
        node = self.settings.node
        handlers: list[Any] = [
            # First: a caller whose certificate does not name its calling AE title is rejected
            # before anything is negotiated.
            *([(evt.EVT_REQUESTED, self._on_requested_bind)] if node.tls_bind_calling_aet else []),
            (evt.EVT_REQUESTED, prefer_requestor_transfer_syntaxes),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        NodeServer.max_per_peer = node.max_associations_per_peer
        NodeServer.network_timeout = node.network_timeout_seconds
        NodeServer.reuse_port = self.reuse_port
        server = self.ae.make_server(
            (node.host, node.port),
            evt_handlers=handlers,
            ssl_context=make_ssl_context(self.settings),
            server_class=NodeServer,
            request_handler=NodeRequestHandler,
        )
        if not isinstance(server, NodeServer):
            raise TypeError(f"pynetdicom made a {type(server).__name__}, not a NodeServer")
        try:
            self._claim_storage()
        except BaseException:
            server.server_close()
            raise
        server.contexts = reactor.ContextList(server.contexts)
        # this node's store, on this server (not its class: another node in the process has its own)
        server.fast_store = self.store_received
        server.fast_store_tmp = self.store.tmp_dir
        self._server = server
        self.ae._servers.append(server)
        threading.Thread(target=server.serve_forever, name="dicom-accept", daemon=True).start()
        self._housekeeper = threading.Thread(target=self._housekeeping, name="settle", daemon=True)
        self._housekeeper.start()
        log.info(
            "listening for DICOM as %s on %s:%d%s",
            node.ae_title,
            node.host,
            self.port,
            " with TLS" if node.tls_enabled else "",
        )

    def _claim_storage(self) -> None:
        """What a starting node does to its storage and database, once its port is bound and
        before it accepts: a second node started by mistake on the same configuration fails to
        bind first, and must not purge tmp/ under the running one (the file each association
        holds for its next data set, the data sets in flight) nor restart its studies' settle
        time."""
        # With several receivers the main process purged tmp/ before forking them (scp.cli);
        # purging here would delete what another receiver is receiving.
        if not self.reuse_port:
            self.store.prepare()
        if self.settles:  # once per node, by the main process, not again by every receiver
            with transaction(self.sessions) as session:
                until = self.clock() + dt.timedelta(seconds=self.settings.study.settle_seconds)
                if extended := extend_settle(session, None, until):
                    log.info(
                        "%d studies were receiving when the node last stopped: settle time restarted",
                        extended,
                    )

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting, let open associations finish (up to ``grace_seconds``), stop."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        deadline = time.monotonic() + grace_seconds
        # Wait for associations still transferring; one already released is only waiting for
        # the peer to close the connection (pynetdicom holds it until ARTIM expires).
        while any(a.is_established for a in self.ae.active_associations) and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            if assoc.is_established:
                assoc.abort()
            else:
                assoc.kill()
        if self._housekeeper is not None:
            self._housekeeper.join(timeout=5)
        self._byte_syncs.shutdown(wait=True)
        if isinstance(self.committer, RemoteCommitter):
            self.committer.close()
        log.info("DICOM listener stopped")

    # -- association bookkeeping -------------------------------------------------------------

    def _peer(self, event: evt.Event) -> dict[str, object]:
        requestor = event.assoc.requestor
        return {
            "calling_ae": str(requestor.ae_title).strip(),
            # the title the caller addressed (the A-ASSOCIATE-RQ's), not necessarily ours
            "called_ae": str(getattr(requestor.primitive, "called_ae_title", "") or "").strip(),
            "peer_address": requestor.address,
            "peer_port": requestor.port,
            "tls": self.settings.node.tls_enabled,
        }

    def _on_accepted(self, event: evt.Event) -> None:
        with self._open_lock:
            self._open[id(event.assoc)] = _OpenAssociation()
        self.associations.write("association-accepted", outcome="success", **self._peer(event))
        log.info(
            "association accepted from %s (%s)",
            event.assoc.requestor.ae_title,
            event.assoc.requestor.address,
        )

    def _on_requested_bind(self, event: evt.Event) -> None:
        """``node.tls_bind_calling_aet``: reject (permanent, calling AE title not recognised,
        PS3.8 9.3.4) an association whose calling AE title its client certificate does not
        name. pynetdicom logs an exception raised here and goes on negotiating, so nothing may
        escape: a certificate that cannot be read is a rejection too."""
        assoc = event.assoc
        calling = ""
        try:
            primitive = assoc.requestor.primitive
            calling = str(primitive.calling_ae_title).strip() if primitive is not None else ""
            sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
            certificate = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
            problem = (
                tls.calling_aet_mismatch(
                    calling, tls.certificate_names(certificate), self.settings.node.tls_client_aets
                )
                if certificate
                else "no verified client certificate"
            )
        except Exception as exc:
            problem = f"its client certificate cannot be read ({type(exc).__name__})"
        if problem is None:
            return
        log.warning("association from %s (%s) refused: %s", calling, assoc.requestor.address, problem)
        try:
            if calling:
                assoc.requestor.ae_title = calling
            assoc.acse.send_reject(0x01, 0x01, 0x03)
            evt.trigger(assoc, evt.EVT_REJECTED, {})
        finally:
            assoc.is_rejected = True  # whatever failed above, pynetdicom never negotiates it now
            assoc.kill()

    def _on_rejected(self, event: evt.Event) -> None:
        self.associations.write("association-rejected", outcome="rejected", **self._peer(event))
        log.warning(
            "association from %s (%s) rejected",
            event.assoc.requestor.ae_title,
            event.assoc.requestor.address,
        )

    def _on_closed(self, event: evt.Event) -> None:
        with self._open_lock:
            ended = self._open.pop(id(event.assoc), None)
        if ended is None:  # the first of released / aborted / closed ends it
            return
        self.associations.write(
            "association-ended", outcome=_ending(event), instances_stored=ended.stored, **self._peer(event)
        )
        if ended.studies:
            self._push_settle(ended.studies)

    def _push_settle(self, studies: set[str]) -> None:
        until = self.clock() + dt.timedelta(seconds=self.settings.study.settle_seconds)
        try:
            with transaction(self.sessions) as session:
                extend_settle(session, studies, until)
        except Exception:
            log.exception("could not extend the settle time of %d open studies", len(studies))

    def _housekeeping(self) -> None:
        interval = min(1.0, max(self.settings.study.settle_seconds / 4, 0.05))
        while not self._stop.wait(interval):
            with self._open_lock:
                sending = set().union(*(opened.studies for opened in self._open.values()))
            if sending:
                self._push_settle(sending)
            if not self.settles:
                continue
            try:
                with transaction(self.sessions) as session:
                    settled = settle_due(session, self.clock(), routes=self.settings.routes)
                for uid in settled:
                    log.info("study %s settled and queued for analysis", uid)
                if self.waiting_reason is not None:
                    with transaction(self.sessions) as session:
                        hold_queued(session, self.waiting_reason)
                with transaction(self.sessions) as session:
                    reaped = reap_expired(session, self.clock())
                for job_id in reaped:
                    log.warning("job %d: its worker's lease expired; queued again", job_id)
            except Exception:
                log.exception("settle loop failed; will retry")

    # -- C-STORE -----------------------------------------------------------------------------

    def remove_if_unreferenced(self, sop_instance_uid: str, relative: str) -> bool:
        """Remove a file this association installed but could not commit, unless a committed row
        names it: two identical instances racing (a modality retrying after a DIMSE timeout)
        share one content-hashed name, and the other may have been acknowledged already. When
        the database cannot say, keep it: an orphan costs disk, a removed acknowledged instance
        is lost. Returns whether the file was removed."""
        try:
            with self.sessions() as session:
                path = session.scalar(
                    select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid)
                )
        except Exception as exc:
            log.warning("keeping %s: the database cannot say whether a row names it (%s)", relative, exc)
            return False
        if path == relative:
            return False
        self.store.remove(relative)
        return True

    def _on_c_store(self, event: evt.Event) -> Dataset | int:
        """pynetdicom's C-STORE event (associations the fast path does not serve)."""
        request = event.request
        if not isinstance(request, C_STORE):
            return int(StoreStatus.PROCESSING_FAILURE)
        status, reason = self.store_received(
            event.assoc,
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            Path(event.dataset_path),
        )
        if reason is None:
            return status
        response = Dataset()
        response.Status = status
        response.ErrorComment = reason[:64]
        return response

    def store_received(
        self,
        assoc: Association,
        sop_class: str,
        sop_instance: str,
        received: Path,
        sha256: str | None = None,
    ) -> tuple[int, str | None]:
        """Store the data set received into ``received`` (removed here, whatever happens):
        the C-STORE status, and the error comment for a failure. Never raises. ``sha256``: of
        the file's bytes, when the receiver hashed them as it wrote them (the fast path)."""
        started = time.perf_counter()
        calling_ae = str(assoc.requestor.ae_title).strip()
        try:
            status, reason, study = self._store(received, sop_class, sop_instance, calling_ae, sha256)
        except Exception as exc:  # a handler must never raise into pynetdicom
            log.exception("C-STORE of %s failed unexpectedly", sop_instance)
            status, reason, study = StoreStatus.PROCESSING_FAILURE, type(exc).__name__, None
        finally:
            received.unlink(missing_ok=True)
        if study is not None:
            with self._open_lock:
                # None: the association ended while this was stored (pynetdicom reports a dropped
                # connection from its network thread); opening it again would never be undone.
                opened = self._open.get(id(assoc))
                if opened is not None:
                    opened.studies.add(study)
                    opened.stored += 1
        elapsed_ms = (time.perf_counter() - started) * 1000
        if status.is_success:
            log.info(
                "stored %s (study %s) from %s in %.1f ms: %s",
                sop_instance,
                study,
                calling_ae,
                elapsed_ms,
                reason,
            )
            return int(status), None
        log.warning("C-STORE %s from %s answered 0x%04X: %s", sop_instance, calling_ae, int(status), reason)
        return int(status), reason

    def _store(
        self, received: Path, sop_class: str, sop_instance: str, calling_ae: str, sha256: str | None
    ) -> tuple[StoreStatus, str, str | None]:
        try:
            self.store.check_free_space(self.settings.storage.min_free_mb)
        except StorageUnavailable as exc:
            return StoreStatus.OUT_OF_RESOURCES, str(exc), None
        bytes_synced = self._byte_syncs.submit(self.store.sync_bytes, received)
        try:
            summary = check_dataset_file(
                received, sop_class, sop_instance, self.inflate_limits, self.dataset_limits
            )
        except DatasetCorrupt as exc:
            return StoreStatus.CANNOT_UNDERSTAND, str(exc), None
        except DatasetMismatch as exc:
            return StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, str(exc), None
        uids = (summary.study_instance_uid, summary.series_instance_uid, sop_instance)
        if not all(is_safe_uid(uid) for uid in uids):
            return (
                StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                "a UID is not a valid DICOM UID",
                None,
            )

        sha256 = sha256 or sha256_of(received)
        relative = self.store.relative_path(*uids, sha256)
        final = self.store.absolute(relative)
        try:
            # A new name is linked at once: the bytes' fsync (running since the data set was
            # complete) and the folder's (the group commit's) then overlap, and the row waits
            # for both. A name already there is a racing twin's, or a file a crash left with no
            # row whose bytes may never have reached the disk: replaced by ours once ours are
            # durable (same name, same bytes), and never removed by us.
            linked = self.store.link_new(received, relative)
            created = bool(linked)
            if not linked:
                bytes_synced.result()
                self.store.install(received, relative, sync_folder=False, bytes_synced=True)
            crashpoints.reached("ingest.after_rename")
            instance = ReceivedInstance(
                sop_instance_uid=sop_instance,
                study_instance_uid=summary.study_instance_uid,
                series_instance_uid=summary.series_instance_uid,
                sop_class_uid=sop_class,
                transfer_syntax_uid=summary.transfer_syntax_uid,
                path=relative,
                size=final.stat().st_size,
                sha256=sha256,
                calling_ae_title=calling_ae,
                header=summary.header_index(),
            )
            # The folder's fsync (the rename's durability) and the row go in one group commit. A
            # file already there may be a racing twin's whose folder sync is still to come.
            result = self.committer.record(instance, final.parent, bytes_synced if created else None)
            crashpoints.reached("ingest.after_commit")
        except StorageUnavailable as exc:
            if created:
                self.remove_if_unreferenced(sop_instance, relative)
            return StoreStatus.OUT_OF_RESOURCES, str(exc), None
        except CommitRefused as exc:  # the commit process logged why
            if created:
                self.remove_if_unreferenced(sop_instance, relative)
            return StoreStatus.PROCESSING_FAILURE, exc.cause, None
        except Exception:  # a row the database refuses (a NUL inside a value, say): no orphan file
            if created:
                self.remove_if_unreferenced(sop_instance, relative)
            raise  # answered 0x0110 by the handler, with the cause logged
        if result.outcome is IngestOutcome.OWN_OUTPUT and created:
            self.store.remove(relative)  # no row names it
        if result.superseded_path:
            self.store.remove(result.superseded_path)
        return StoreStatus.SUCCESS, result.outcome.value, summary.study_instance_uid
