"""Our overrides of pynetdicom's internals (scp/reactor.py), each against the pynetdicom they were
written for and over a real association on loopback."""

from __future__ import annotations

import copy
import os
import socket
import struct
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import delete, select

from conf import NodeSettings, Settings, StorageSettings, StudySettings
from scp import reactor
from scp.dimse_codec import StoreRequest, command_elements, command_pdu, pdvs
from scp.server import StorageSCP
from storage.db import open_database
from storage.files import sha256_of
from storage.models import Instance
from tests.data.generate import CT_SMALL, write_series
from tests.nodes import free_port


def test_every_copied_function_is_the_one_installed() -> None:
    """A pynetdicom upgrade that changes a function we copied turns the overrides off (slower,
    still correct); this fails so that someone re-reads the new source and pins it again."""
    assert reactor.changed_upstream() == (), "pynetdicom changed; re-check scp/reactor.py and re-pin"


def test_a_changed_upstream_function_is_reported() -> None:
    sources = dict(reactor.UPSTREAM_SOURCES)
    function, _pinned = sources["AssociationSocket.recv"]
    sources["AssociationSocket.recv"] = (function, "0" * 64)
    assert reactor.changed_sources(sources) == ("AssociationSocket.recv",)


def _associate(port: int, maximum_pdu: int = 16382) -> Association:
    ae = AE(ae_title="MODALITY")
    ae.maximum_pdu_size = maximum_pdu
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    assert assoc.is_established
    return assoc


def _served(scp: StorageSCP) -> Association:
    deadline = time.monotonic() + 5
    while not scp.ae.active_associations and time.monotonic() < deadline:
        time.sleep(0.01)
    (served,) = scp.ae.active_associations
    return served


def test_an_association_runs_on_the_overrides_and_stores_intact(scp: StorageSCP, tmp_path: Path) -> None:
    files = write_series(tmp_path / "ct", 3)  # 512 x 512 x 16 bit: one 1 MiB PDU each
    assoc = _associate(scp.port)
    served = _served(scp)
    assert isinstance(served, reactor.EventDrivenAssociation)
    assert isinstance(served.dul, reactor.EventDrivenDUL)
    assert isinstance(served.dul.socket, reactor.BulkReceiveSocket)
    assert assoc.send_c_echo().Status == 0x0000
    for path in files:
        assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    assert _fast_stores(served) == len(files)  # every C-STORE took the fast path
    # The next data set's file, made once the last answer went out: one, empty, reused.
    assert _spare_made(scp).stat().st_size == 0
    assert list(scp.store.tmp_dir.iterdir()) == [_spare_made(scp)]
    assoc.release()
    assert assoc.is_released
    # The acceptor side ends with the release, not after a poll's timeout or the network timeout.
    served.join(timeout=2)
    assert not served.is_alive() and served.is_released
    assert list(scp.store.tmp_dir.iterdir()) == []  # the spare went with the association
    for path in files:
        sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        (stored,) = scp.store.instances_dir.glob(f"*/*/{sop}.*.dcm")
        # What the SCU sent is what pydicom writes again; the stored file has the same dataset.
        assert dcmread(stored).PixelData == dcmread(path).PixelData
        assert sha256_of(stored)[:16] in stored.name


def _accepting_slowly(scp: StorageSCP, tmp_path: Path, seconds: float) -> Path:
    """The node's EVT_ACCEPTED handlers take ``seconds`` from now on; returns a small CT to send."""
    (path,) = write_series(tmp_path / "ct", 1, source=CT_SMALL)
    assert scp._server is not None
    scp._server.bind(evt.EVT_ACCEPTED, lambda event: time.sleep(seconds))
    return path


def test_a_c_store_sent_while_the_node_still_accepts_takes_the_fast_path(
    scp: StorageSCP, tmp_path: Path
) -> None:
    """The A-ASSOCIATE-AC leaves before the node's EVT_ACCEPTED handlers run; a peer that sends
    at once is served when accepting ends, on the fast path, and counted for its association."""
    path = _accepting_slowly(scp, tmp_path, seconds=0.5)
    assoc = _associate(scp.port)
    assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    served = _served(scp)
    assert _fast_stores(served) == 1
    assert scp._open[id(served)].stored == 1
    assoc.release()


def test_a_c_store_waiting_for_a_slow_accept_is_not_a_network_timeout(
    scp: StorageSCP, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Accepting outlasts the network timeout while the peer's C-STORE waits for it: the peer
    is waiting for the node, not idle. The DUL thread resumes slowly after the wait (a loaded
    machine), so the association thread looks at the timer first."""
    scp.ae.network_timeout = 1.0
    path = _accepting_slowly(scp, tmp_path, seconds=1.5)
    open_receiving = reactor.EventDrivenDUL._open_receiving

    def slowly(dul: reactor.EventDrivenDUL, request: StoreRequest, context_id: int) -> object:
        time.sleep(0.2)
        return open_receiving(dul, request, context_id)

    monkeypatch.setattr(reactor.EventDrivenDUL, "_open_receiving", slowly)
    assoc = _associate(scp.port)
    response = assoc.send_c_store(dcmread(path))
    served = _served(scp)
    assert not served.is_aborted
    assert response and response.Status == 0x0000
    assert _fast_stores(served) == 1
    assoc.release()


def test_a_peer_abort_ends_the_served_association(scp: StorageSCP) -> None:
    assoc = _associate(scp.port)
    served = _served(scp)
    assoc.abort()
    served.join(timeout=2)
    assert not served.is_alive() and served.is_aborted


def test_an_idle_peer_is_dropped_at_the_network_timeout(scp: StorageSCP) -> None:
    assoc = _associate(scp.port)
    served = _served(scp)
    assert assoc.send_c_echo().Status == 0x0000
    served.join(timeout=15)  # network_timeout_seconds = 5; the capped waits still see the timer
    assert not served.is_alive()
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_established


def test_a_copy_of_the_context_list_is_independent_of_the_server_s() -> None:
    server_contexts = reactor.ContextList(
        build_context(uid, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
        for uid in (
            CTImageStorage,
            Verification,
        )
    )
    copied = copy.deepcopy(server_contexts)
    assert [c.abstract_syntax for c in copied] == [CTImageStorage, Verification]
    assert all(a is not b for a, b in zip(copied, server_contexts, strict=True))
    reactor.reorder_transfer_syntaxes(copied[0], ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"])
    assert copied[0].transfer_syntax == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    assert server_contexts[0].transfer_syntax == ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"]
    assert copied[1].transfer_syntax == server_contexts[1].transfer_syntax


def _bulk_socket(sock: socket.socket) -> reactor.BulkReceiveSocket:
    bulk = object.__new__(reactor.BulkReceiveSocket)  # only its ``socket`` is used by recv
    bulk.socket = sock
    return bulk


def test_a_huge_declared_pdu_length_costs_only_what_arrives() -> None:
    # A PDU header is 6 bytes from anyone who connects; its length field may say 4 GiB. The
    # buffer grows with what arrives, as pynetdicom's own receive does, not with what is declared.
    ours, peer = socket.socketpair()
    with ours, peer:
        peer.sendall(b"0123456789")
        peer.shutdown(socket.SHUT_WR)
        tracemalloc.start()
        try:
            got = _bulk_socket(ours).recv(512 * 1024 * 1024)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert got == bytearray(b"0123456789")
    assert peak < 8 * 1024 * 1024


def test_the_bulk_receive_returns_a_large_pdu_intact() -> None:
    payload = os.urandom(5 * 1024 * 1024 + 3)
    ours, peer = socket.socketpair()
    with ours, peer:
        sender = threading.Thread(target=peer.sendall, args=(payload,))
        sender.start()
        got = _bulk_socket(ours).recv(len(payload))
        sender.join(timeout=10)
    assert got == bytearray(payload)


def test_a_peer_that_takes_only_small_pdus_gets_the_response_in_fragments(
    scp: StorageSCP, tmp_path: Path
) -> None:
    (path,) = write_series(tmp_path / "ct", 1, source=CT_SMALL)
    assoc = _associate(scp.port, maximum_pdu=40)  # each PDU holds 32 bytes of the response
    served = _served(scp)
    response = assoc.send_c_store(dcmread(path))
    assert response.Status == 0x0000
    assert _fast_stores(served) == 1
    assoc.release()
    sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert len(list(scp.store.instances_dir.glob(f"*/*/{sop}.*.dcm"))) == 1


def _raw(assoc: Association) -> socket.socket:
    """The requestor's TCP socket, to send what pynetdicom would not."""
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    return assoc.dul.socket.socket


def _fast_stores(served: Association) -> int:
    assert isinstance(served.dul, reactor.EventDrivenDUL)
    return served.dul.fast_stores


def _command(elements: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HHL", 0, element, len(value)) + value for element, value in elements)
    return struct.pack("<HHL", 0, 0, 4) + struct.pack("<L", len(body)) + body


def _store_command(sop_instance: str, sop_class: str = str(CTImageStorage)) -> bytes:
    uid = sop_instance.encode() + b"\0" * (len(sop_instance) % 2)
    return _command(
        [
            (0x0002, sop_class.encode() + b"\0" * (len(sop_class) % 2)),
            (0x0100, struct.pack("<H", 0x0001)),
            (0x0110, struct.pack("<H", 1)),
            (0x0700, struct.pack("<H", 0)),
            (0x0800, struct.pack("<H", 0x0000)),
            (0x1000, uid),
        ]
    )


def _ct_context(assoc: Association) -> int:
    (context,) = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == CTImageStorage]
    assert context.context_id is not None
    return context.context_id


def _data_fragment(context_id: int, data: bytes, last: bool) -> bytes:
    item = struct.pack(">LBB", len(data) + 2, context_id, 0x02 if last else 0x00) + data
    return struct.pack(">BBL", 0x04, 0, len(item)) + item


def _tmp_files(scp: StorageSCP) -> list[Path]:
    return [p for p in scp.store.tmp_dir.iterdir() if p.suffix == ".dcm"]


def _received_files(scp: StorageSCP) -> list[Path]:
    """Files under tmp/ holding received data, while an association goes on: its spare for the
    next data set, made once an answer went out, is empty."""
    return [p for p in _tmp_files(scp) if p.stat().st_size]


def _half_sent_c_store(scp: StorageSCP, sop_instance: str) -> tuple[Association, Association, int]:
    """An association that sent a C-STORE command and the first fragment of its data set, once
    the fast path receives it into a file under tmp/: (ours, the node's, the context ID)."""
    assoc = _associate(scp.port)
    served = _served(scp)
    context = _ct_context(assoc)
    _raw(assoc).sendall(command_pdu(context, _store_command(sop_instance)))
    _raw(assoc).sendall(_data_fragment(context, b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", last=False))
    deadline = time.monotonic() + 5
    while not _tmp_files(scp) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _tmp_files(scp), "the fast path receives into a file under tmp/"
    return assoc, served, context


def test_a_data_set_interrupted_by_another_command_aborts_and_leaves_no_file(scp: StorageSCP) -> None:
    assoc, served, context = _half_sent_c_store(scp, "1.2.3.4")
    _raw(assoc).sendall(command_pdu(context, _command([(0x0100, struct.pack("<H", 0x0030))])))
    served.join(timeout=5)
    assert not served.is_alive() and served.is_aborted
    assert _tmp_files(scp) == []
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted


def test_a_peer_gone_mid_data_set_leaves_no_file(scp: StorageSCP) -> None:
    assoc, served, _ = _half_sent_c_store(scp, "1.2.3.5")
    raw = _raw(assoc)
    raw.shutdown(socket.SHUT_RDWR)
    served.join(timeout=5)
    assoc.kill()
    raw.close()
    assert not served.is_alive()
    assert _tmp_files(scp) == []


def test_a_truncated_data_set_on_the_fast_path_is_refused_and_the_node_keeps_serving(
    scp: StorageSCP, tmp_path: Path
) -> None:
    assoc = _associate(scp.port)
    served = _served(scp)
    context = _ct_context(assoc)
    responses: list[bytes] = []
    raw = _raw(assoc)
    # take the DUL's reads away from it: the test reads the response itself
    assoc.dul._kill_thread = True
    assoc.dul.join(timeout=2)
    raw.sendall(command_pdu(context, _store_command("1.2.3.6")))
    raw.sendall(_data_fragment(context, b"\x08\x00\x05\x00CS\x0a\x00ISO_IR", last=True))
    raw.settimeout(5)
    header = raw.recv(6, socket.MSG_WAITALL)
    responses.append(header + raw.recv(struct.unpack(">L", header[2:])[0], socket.MSG_WAITALL))
    ((item),) = list(pdvs(responses[0]))
    status = command_elements(item.data)[0x0900]
    assert int.from_bytes(status, "little") in (0xA900, 0xC000, 0xC210, 0xC211)
    assert _fast_stores(served) == 1 and served.is_established
    assert _received_files(scp) == []
    raw.close()


def test_uid_checks_are_cached_and_an_invalid_uid_still_fails_every_time() -> None:
    import pynetdicom.presentation

    assert reactor.cache_uid_checks()
    assert getattr(pynetdicom.presentation, "set_uid") is reactor._set_uid  # noqa: B009
    context = pynetdicom.presentation.PresentationContext()
    context.abstract_syntax = "1.2.840.10008.5.1.4.1.1.2"
    before = reactor._cached_set_uid.cache_info().hits
    again = pynetdicom.presentation.PresentationContext()
    again.abstract_syntax = "1.2.840.10008.5.1.4.1.1.2"
    assert reactor._cached_set_uid.cache_info().hits == before + 1
    assert again.abstract_syntax == "1.2.840.10008.5.1.4.1.1.2"
    for _ in range(2):
        with pytest.raises(ValueError), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's own warning before pynetdicom's refusal
            reactor._set_uid("1." + "2" * 70, "affected_sop_class_uid")  # over 64 characters
    assert reactor._cached_set_uid.cache_info().maxsize == 4096


def test_a_file_a_crash_left_without_a_row_is_replaced_by_the_bytes_received_again(
    scp: StorageSCP, tmp_path: Path
) -> None:
    """A new name is linked before its bytes are fsynced; after a power loss the name may hold
    bytes that never reached the disk, with no row. The modality sends again: the file is
    replaced by the received bytes (never trusted by name alone)."""
    (path,) = write_series(tmp_path / "ct", 1, source=CT_SMALL)
    sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assoc = _associate(scp.port)
    assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    (stored,) = scp.store.instances_dir.glob(f"*/*/{sop}.*.dcm")
    intact = stored.read_bytes()
    with scp.sessions.begin() as session:  # the crash came before the commit
        session.execute(delete(Instance).where(Instance.sop_instance_uid == sop))
    stored.write_bytes(b"\0" * len(intact))  # the bytes never reached the disk
    assert assoc.send_c_store(dcmread(path)).Status == 0x0000
    assoc.release()
    assert stored.read_bytes() == intact
    with scp.sessions() as session:
        assert session.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop)) is not None


@pytest.mark.parametrize("ending", ["abort", "release", "close"])
def test_a_data_set_left_to_pynetdicom_unfinished_leaves_no_file(scp: StorageSCP, ending: str) -> None:
    """A command split over two fragments is pynetdicom's to decode; it streams the data set to a
    file under tmp/ too. An association that ends before the last fragment must not leave it
    there (a peer repeating this would fill the disk until the node restarts)."""
    assoc = _associate(scp.port)
    served = _served(scp)
    context = _ct_context(assoc)
    command = _store_command("1.2.3.7")
    split = struct.pack(">LBB", 12, context, 0x01) + command[:10]
    split += struct.pack(">LBB", len(command) - 8, context, 0x03) + command[10:]
    raw = _raw(assoc)
    raw.sendall(struct.pack(">BBL", 0x04, 0, len(split)) + split)
    raw.sendall(_data_fragment(context, b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", last=False))
    deadline = time.monotonic() + 5
    while not _tmp_files(scp) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _tmp_files(scp), "pynetdicom receives into a file under tmp/"
    if ending == "abort":
        assoc.abort()
    elif ending == "release":
        assoc.release()
    else:
        raw.shutdown(socket.SHUT_RDWR)
        assoc.kill()
        raw.close()
    served.join(timeout=5)
    assert not served.is_alive()
    assert _fast_stores(served) == 0
    assert _tmp_files(scp) == []


def test_each_node_in_a_process_stores_what_it_receives_itself(scp: StorageSCP, tmp_path: Path) -> None:
    """The fast path calls the store of the node that accepted the association: a second node
    started in the same process must not take the first one's instances into its own storage."""
    root = tmp_path / "other"
    settings = Settings(
        node=NodeSettings(host="127.0.0.1", port=free_port(), network_timeout_seconds=5),
        storage=StorageSettings(root=root, database_url=f"sqlite:///{root}/ainode.db", min_free_mb=1),
        study=StudySettings(settle_seconds=30),
    )
    (path,) = write_series(tmp_path / "ct", 1, source=CT_SMALL)
    with open_database(settings.storage.database_url) as sessions:
        other = StorageSCP(settings, sessions)
        other.start()
        try:
            assoc = _associate(scp.port)
            assert assoc.send_c_store(dcmread(path)).Status == 0x0000
            assoc.release()
        finally:
            other.stop(grace_seconds=2)
    assert len(list(scp.store.instances_dir.glob("*/*/*.dcm"))) == 1
    assert list(other.store.instances_dir.glob("*/*/*.dcm")) == []


def test_a_sop_class_not_negotiated_on_its_context_is_refused_0122_and_nothing_is_kept(
    scp: StorageSCP, tmp_path: Path
) -> None:
    """pynetdicom aborts such an association; DCMTK's storescp stores it. A C-STORE saying MR on
    the context negotiated for CT gets 0x0122 (SOP Class not supported), the association goes on."""
    assoc = _associate(scp.port)
    served = _served(scp)
    context = _ct_context(assoc)
    raw = _raw(assoc)
    assoc.dul._kill_thread = True  # the test reads the response itself
    assoc.dul.join(timeout=2)
    raw.sendall(command_pdu(context, _store_command("1.2.3.7", sop_class="1.2.840.10008.5.1.4.1.1.4")))
    raw.sendall(_data_fragment(context, b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", last=True))
    raw.settimeout(5)
    header = raw.recv(6, socket.MSG_WAITALL)
    response = header + raw.recv(struct.unpack(">L", header[2:])[0], socket.MSG_WAITALL)
    ((item),) = list(pdvs(response))
    elements = command_elements(item.data)
    assert int.from_bytes(elements[0x0900], "little") == 0x0122
    assert b"not negotiated" in elements[0x0902]
    assert _fast_stores(served) == 1 and served.is_established
    assert _received_files(scp) == [] and list(scp.store.instances_dir.glob("*/*/*.dcm")) == []
    raw.close()


def _spare_made(scp: StorageSCP) -> Path:
    """The association's file for its next data set, made just after its answer went out (the
    peer may read the answer first): waited for."""
    deadline = time.monotonic() + 5
    while not (files := _tmp_files(scp)) and time.monotonic() < deadline:
        time.sleep(0.01)
    (spare,) = files
    return spare


def test_a_second_node_started_on_the_same_configuration_leaves_the_running_one_s_files(
    scp: StorageSCP, tmp_path: Path
) -> None:
    """An operator starts the node again while it runs (one receiving process): the second one
    cannot bind the port and must leave tmp/ alone, or the file each open association holds for
    its next data set is gone and that C-STORE fails."""
    first, second = write_series(tmp_path / "ct", 2, source=CT_SMALL)
    assoc = _associate(scp.port)
    assert assoc.send_c_store(dcmread(first)).Status == 0x0000
    spare = _spare_made(scp)
    again = StorageSCP(scp.settings, scp.sessions)
    with pytest.raises(OSError):
        again.start()
    assert spare.exists()
    assert assoc.send_c_store(dcmread(second)).Status == 0x0000
    assoc.release()
    assert len(list(scp.store.instances_dir.glob("*/*/*.dcm"))) == 2
