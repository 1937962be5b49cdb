"""Our overrides of pynetdicom's internals (scp/reactor.py), each against the pynetdicom they were
written for and over a real association on loopback."""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from conf import NodeSettings, Settings, StorageSettings, StudySettings
from scp import reactor
from scp.server import StorageSCP
from storage.db import open_database
from storage.files import sha256_of
from tests.data.generate import write_series
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


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[StorageSCP]:
    root = tmp_path / "var"
    settings = Settings(
        node=NodeSettings(host="127.0.0.1", port=free_port(), network_timeout_seconds=5),
        storage=StorageSettings(root=root, database_url=f"sqlite:///{root}/ainode.db", min_free_mb=1),
        study=StudySettings(settle_seconds=30),
    )
    with open_database(settings.storage.database_url) as sessions:
        node = StorageSCP(settings, sessions)
        node.start()
        try:
            yield node
        finally:
            node.stop(grace_seconds=2)


def _associate(port: int) -> Association:
    ae = AE(ae_title="MODALITY")
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
    assoc.release()
    assert assoc.is_released
    # The acceptor side ends with the release, not after a poll's timeout or the network timeout.
    served.join(timeout=2)
    assert not served.is_alive() and served.is_released
    for path in files:
        sop = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        (stored,) = scp.store.instances_dir.glob(f"*/*/{sop}.*.dcm")
        # What the SCU sent is what pydicom writes again; the stored file has the same dataset.
        assert dcmread(stored).PixelData == dcmread(path).PixelData
        assert sha256_of(stored)[:16] in stored.name


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
