"""The SCU side for setup checks: ``ainode echo`` and ``ainode send``."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from scp.errors import PeerError
from scp.peers import Peer
from scp.server import set_nodelay

log = logging.getLogger("ainode.scu")
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclass(frozen=True)
class SendResult:
    path: Path
    sop_instance_uid: str
    status: int  # DIMSE status; -1 when no response came back

    @property
    def ok(self) -> bool:
        return self.status == 0x0000 or (self.status & 0xF000) == 0xB000


def _associate(ae: AE, peer: Peer) -> Association:
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise PeerError(f"association with {peer} was not established (rejected, aborted or unreachable)")
    if assoc.dul.socket is not None and assoc.dul.socket.socket is not None:
        set_nodelay(assoc.dul.socket.socket)
    return assoc


def _new_ae(calling_ae_title: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.network_timeout = ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    return ae


def echo(peer: Peer, calling_ae_title: str = "AINODE", timeout: float = 30.0) -> int:
    """C-ECHO ``peer``; return the DIMSE status or raise :class:`PeerError`."""
    ae = _new_ae(calling_ae_title, timeout)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, peer)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in status:
        raise PeerError(f"C-ECHO to {peer}: no response")
    return int(status.Status)


def dicom_files(paths: Iterable[Path]) -> list[Path]:
    """Expand folders into the files below them, sorted."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


def dicom_headers(files: Iterable[Path]) -> tuple[dict[Path, Dataset], list[tuple[Path, str]]]:
    """The header of each DICOM file, and the files that are not DICOM instances with why (a
    folder holds DICOMDIRs, README files, thumbnails)."""
    headers: dict[Path, Dataset] = {}
    skipped: list[tuple[Path, str]] = []
    for path in files:
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            skipped.append((path, f"not a DICOM file ({type(exc).__name__})"))
            continue
        missing = [k for k in ("SOPClassUID", "SOPInstanceUID") if k not in ds]
        if missing or "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
            skipped.append((path, f"not a DICOM instance (no {', '.join(missing) or 'file meta'})"))
            continue
        headers[path] = ds
    return headers, skipped


def send(
    headers: dict[Path, Dataset], peer: Peer, calling_ae_title: str = "AINODE", timeout: float = 30.0
) -> list[SendResult]:
    """C-STORE each file to ``peer`` over one association, proposing each file's own transfer
    syntax (as stored, no re-encoding) with an uncompressed fallback."""
    ae = _new_ae(calling_ae_title, timeout)
    contexts: dict[str, set[str]] = {}
    for ds in headers.values():
        contexts.setdefault(str(ds.SOPClassUID), set(UNCOMPRESSED)).add(str(ds.file_meta.TransferSyntaxUID))
    for sop_class, syntaxes in contexts.items():
        for syntax in sorted(syntaxes):
            ae.add_requested_context(sop_class, syntax)
    assoc = _associate(ae, peer)
    results: list[SendResult] = []
    try:
        for path, header in headers.items():
            status = assoc.send_c_store(path)
            code = int(status.Status) if "Status" in status else -1
            results.append(SendResult(path, str(header.SOPInstanceUID), code))
            if code == -1 and not assoc.is_established:
                raise PeerError(f"association with {peer} dropped while sending {path}")
    finally:
        if assoc.is_established:
            assoc.release()
    return results
