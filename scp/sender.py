"""The SR sender: C-STORE (or DICOMweb STOW-RS, :mod:`scp.stow`) of queued SRs to each
destination, one thread per destination so a PACS that is down never delays the others.

Each association proposes only the SR's SOP class, in the file's own transfer syntax with an
uncompressed fallback, with TCP_NODELAY; over DICOM TLS where the destination says ``tls = true``
(:mod:`scp.tls`: the PACS's certificate verified, never a fallback to clear text). Success and
warnings complete the delivery; transient answers (0xA7xx out of resources, 0x0110 processing
failure), refused or dropped connections, failed TLS handshakes and any unexpected error retry
with backoff, up to ``delivery.max_attempts``; any other answer (or no SR context accepted) is
dead-lettered with the reason. No exception leaves a delivery ``sending``.
"""

from __future__ import annotations

import datetime as dt
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy.orm import Session, sessionmaker

from conf import DestinationSettings, Settings
from scp import tls
from scp.server import set_nodelay
from scp.statuses import StoreStatus, is_transient_failure
from scp.stow import stow_instance
from storage import crashpoints, outbox
from storage.db import transaction
from storage.errors import LeaseLost
from storage.models import utc_now
from storage.owners import host_of, process_alive, this_process

log = logging.getLogger("ainode.sender")
LEASE_SECONDS = 300.0
WARNING_STATUSES = frozenset({0x0107, 0x0116, 0xB000, 0xB006, 0xB007})


def _no_tls_traceback(record: logging.LogRecord) -> bool:
    """pynetdicom logs a failed TLS handshake's traceback at ERROR on every attempt; the
    delivery's own line says why in one line."""
    return not isinstance(record.msg, ssl.SSLError)  # logger.exception(exc): the traceback


@dataclass(frozen=True)
class Outcome:
    kind: str  # "sent", "retry" or "dead"
    status: int | None
    detail: str


def deliver(path: Path, destination: DestinationSettings, calling_ae_title: str, timeout: float) -> Outcome:
    """One file to one destination, by STOW-RS or C-STORE as it is configured, classified."""
    if destination.stow_url is not None:
        header = dcmread(path, stop_before_pixels=True)
        answer = stow_instance(
            path, destination, str(header.StudyInstanceUID), str(header.SOPInstanceUID), timeout
        )
        return Outcome(answer.kind, answer.status, answer.detail)
    return store_sr(path, destination, calling_ae_title, timeout)


def store_sr(path: Path, destination: DestinationSettings, calling_ae_title: str, timeout: float) -> Outcome:
    """One C-STORE of one file to one destination, classified."""
    header = dcmread(path, stop_before_pixels=True)
    host, port = destination.address
    called_ae_title = str(destination.ae_title)
    syntaxes = list(
        dict.fromkeys(
            [str(header.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
    )
    ae = AE(ae_title=calling_ae_title)
    # connection_timeout also bounds the TLS handshake: a peer without TLS reads the ClientHello
    # as the start of a PDU and waits for the rest.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    ae.add_requested_context(str(header.SOPClassUID), syntaxes)
    context = tls.client_context(destination) if destination.tls else None
    tls_args = None if context is None else (context, tls.server_name(destination))
    assoc = ae.associate(host, port, ae_title=called_ae_title, tls_args=tls_args)
    if not assoc.is_established:
        if assoc.is_rejected:
            return Outcome("retry", None, f"association rejected by {called_ae_title}")
        if context is not None and context.failure is not None:
            failure = context.failure
            return Outcome("retry", None, f"TLS with {host}:{port} failed: {failure}; nothing sent")
        if context is not None:
            return Outcome(
                "retry",
                None,
                f"no association with {host}:{port} over TLS (refused, no answer, or our client certificate "
                "not accepted)",
            )
        return Outcome("retry", None, f"cannot reach {host}:{port} (refused or no answer)")
    try:
        if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
            set_nodelay(assoc.dul.socket.socket)
        if not assoc.accepted_contexts:
            return Outcome(
                "dead", None, f"{called_ae_title} accepts no context for {header.SOPClassUID.name}"
            )
        response = assoc.send_c_store(path)
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in response:
        return Outcome("retry", None, "no C-STORE response (connection dropped or timed out)")
    status = int(response.Status)
    if status == 0x0000 or status in WARNING_STATUSES:
        return Outcome("sent", status, "stored" if status == 0 else f"stored with warning 0x{status:04X}")
    comment = str(response.get("ErrorComment", "")).strip()
    if is_transient_failure(status):
        if status == StoreStatus.PROCESSING_FAILURE:
            return Outcome("retry", status, f"processing failure (0x0110){': ' + comment if comment else ''}")
        return Outcome("retry", status, f"out of resources (0x{status:04X})")
    return Outcome("dead", status, f"C-STORE refused with 0x{status:04X}{': ' + comment if comment else ''}")


class SrSender:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        clock: Callable[[], dt.datetime] = utc_now,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.clock = clock
        self.poll_seconds = settings.delivery.poll_seconds
        self.owner = this_process()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        logging.getLogger("pynetdicom.transport").addFilter(_no_tls_traceback)
        with transaction(self.sessions) as session:
            reclaimed = outbox.reclaim_orphans(session, host_of(self.owner), process_alive, self.clock())
        if reclaimed:
            log.warning("%d delivery(ies) of a stopped process on this host are due again now", reclaimed)
        for destination in self.settings.destinations:
            thread = threading.Thread(
                target=self._run, args=(destination,), name=f"send-{destination.name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        log.info("SR sender started for %d destination(s)", len(self._threads))

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _run(self, destination: DestinationSettings) -> None:
        while not self._stop.is_set():
            try:
                if not self.send_next(destination):
                    self._stop.wait(self.poll_seconds)
            except Exception:
                log.exception("sender for %s failed; will retry", destination.name)
                self._stop.wait(self.poll_seconds)

    def send_next(self, destination: DestinationSettings) -> bool:
        """Send one due delivery to ``destination``; False when there was none."""
        with transaction(self.sessions) as session:
            delivery = outbox.claim(session, destination.name, LEASE_SECONDS, self.clock(), self.owner)
        if delivery is None:
            return False
        path = self.settings.storage.root / delivery.sr_path
        started = time.perf_counter()
        try:
            outcome = deliver(
                path, destination, self.settings.node.ae_title, self.settings.node.network_timeout_seconds
            )
        except Exception as exc:  # a missing file, a PACS that breaks pynetdicom: retried, recorded
            log.exception("outbox %d: sending to %s failed", delivery.id, destination.name)
            outcome = Outcome("retry", None, f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:300])
        if outcome.kind == "sent":
            crashpoints.reached("delivery.mid_send")
        policy = self.settings.delivery
        if outcome.kind == "retry" and delivery.attempts >= policy.max_attempts:
            outcome = Outcome(
                "dead", outcome.status, f"gave up after {delivery.attempts} attempts: {outcome.detail}"
            )
        try:
            with transaction(self.sessions) as session:
                now = self.clock()
                if outcome.kind == "sent":
                    outbox.mark_sent(session, delivery, outcome.status or 0, now)
                elif outcome.kind == "retry":
                    delay = outbox.retry_delay(
                        delivery.attempts, policy.retry_base_seconds, policy.retry_cap_seconds
                    )
                    outbox.mark_retry(session, delivery, outcome.detail, outcome.status, now, delay)
                else:
                    outbox.mark_dead(session, delivery, outcome.detail, outcome.status, now)
        except LeaseLost:
            log.warning("outbox %d: lease lost while sending; another sender owns it", delivery.id)
            return True
        level = logging.INFO if outcome.kind == "sent" else logging.WARNING
        log.log(
            level,
            "SR %s of study %s to %s (%s): %s, attempt %d, %.0f ms",
            delivery.sr_sop_instance_uid,
            delivery.study_instance_uid,
            destination.name,
            destination.describe(),
            outcome.detail,
            delivery.attempts,
            (time.perf_counter() - started) * 1000,
        )
        return True
