"""SRs delivered to real PACS: Orthanc, a PACS that is down for a while, one that refuses SRs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import Comprehensive3DSRStorage  # type: ignore[attr-defined]

from tests.data.generate import write_series
from tests.data.sr import complete_with_simulated_findings
from tests.data.validators import sr_errors
from tests.nodes import Node, NodeFactory, dcmtk, free_port, orthanc


def _study(tmp_path: Path, count: int = 6) -> tuple[str, list[Path]]:
    study = generate_uid()
    return study, write_series(tmp_path / "ct", count, study_instance_uid=study)


def _send_to_node(node: Node, files: list[Path]) -> None:
    sent = dcmtk("storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files))
    assert sent.returncode == 0, sent.stderr


def _orthanc_series(http_port: int, study: str) -> list[dict[str, Any]]:
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
        found = client.post("/tools/lookup", content=study).json()
        (study_id,) = [f["ID"] for f in found if f["Type"] == "Study"]
        series: list[dict[str, Any]] = client.get(f"/studies/{study_id}/series").json()
        return series


def _upload(http_port: int, files: list[Path]) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
        for path in files:
            client.post("/instances", content=path.read_bytes()).raise_for_status()


def _wait_state(node: Node, study: str, state: str, timeout: float = 30) -> dict[str, Any]:
    return node.wait_for_state(study, state, timeout=timeout)


def test_the_sr_arrives_in_the_source_study_on_orthanc(make_node: NodeFactory, tmp_path: Path) -> None:
    study, files = _study(tmp_path)
    with orthanc(tmp_path) as ports:
        _upload(ports["http_port"], files)
        node = make_node(
            destinations=[
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": ports["dicom_port"]}
            ]
        ).start()
        _send_to_node(node, files)
        _wait_state(node, study, "waiting")  # no API key: stored, queued, held
        sr_uid = complete_with_simulated_findings(node.database_url, node.root, study, ["pacs"])
        row = _wait_state(node, study, "done")
        assert row["sr_sop_instance_uid"] == sr_uid
        assert [(d["destination"], d["state"], d["attempts"]) for d in row["deliveries"]] == [
            ("pacs", "sent", 1)
        ]
        series = _orthanc_series(ports["http_port"], study)
    assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CT", "SR"]
    (sr_series,) = [s for s in series if s["MainDicomTags"]["Modality"] == "SR"]
    assert sr_series["MainDicomTags"]["SeriesDescription"] == "AI findings - UNVERIFIED"
    assert len(sr_series["Instances"]) == 1
    (sr_file,) = (node.root / "sr").rglob("*.dcm")
    assert dcmread(sr_file).StudyInstanceUID == study
    assert sr_errors(sr_file) == []


def test_orthanc_down_then_up_gets_the_sr_exactly_once(make_node: NodeFactory, tmp_path: Path) -> None:
    study, files = _study(tmp_path)
    dicom_port, http_port = free_port(), free_port()
    node = make_node(
        destinations=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": dicom_port}],
        delivery={"retry_base_seconds": 0.5, "retry_cap_seconds": 1.0, "poll_seconds": 0.2},
    ).start()
    _send_to_node(node, files)
    _wait_state(node, study, "waiting")  # no API key: stored, queued, held
    complete_with_simulated_findings(node.database_url, node.root, study, ["pacs"])
    deadline = time.monotonic() + 30
    while node.status()[0]["deliveries"][0]["attempts"] < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    waiting = node.status()[0]
    assert waiting["state"] == "sending"
    delivery = waiting["deliveries"][0]
    # Between attempts it is pending; a snapshot may catch it mid-attempt (leased, sending).
    assert delivery["state"] in ("pending", "sending") and "cannot reach" in delivery["last_error"]
    with orthanc(tmp_path, dicom_port=dicom_port, http_port=http_port):
        _upload(http_port, files)
        row = _wait_state(node, study, "done")
        time.sleep(2)  # nothing more arrives afterwards
        series = _orthanc_series(http_port, study)
    (sr_series,) = [s for s in series if s["MainDicomTags"]["Modality"] == "SR"]
    assert len(sr_series["Instances"]) == 1
    assert row["deliveries"][0]["state"] == "sent" and row["deliveries"][0]["attempts"] >= 4


@contextmanager
def refusing_pacs(status: int, *first: int) -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom SCP that counts every SR C-STORE it receives (a duplicate send shows, even
    with the same SOP Instance UID) and answers the first ones with ``first``, then ``status``."""
    received: list[str] = []

    def handle(event: evt.Event) -> int:
        received.append(str(getattr(event.request, "AffectedSOPInstanceUID", "")))
        return first[len(received) - 1] if len(received) <= len(first) else status

    ae = AE(ae_title="PICKYPACS")
    ae.add_supported_context(Comprehensive3DSRStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    if server is None:
        raise RuntimeError("pynetdicom did not start the refusing PACS")
    try:
        yield port, received
    finally:
        server.shutdown()


def test_a_refusing_destination_is_dead_lettered_without_blocking_another(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    study, files = _study(tmp_path)
    with orthanc(tmp_path) as ports, refusing_pacs(0xA900) as (picky_port, refused):
        _upload(ports["http_port"], files)
        node = make_node(
            destinations=[
                {"name": "picky", "ae_title": "PICKYPACS", "host": "127.0.0.1", "port": picky_port},
                {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": ports["dicom_port"]},
            ]
        ).start()
        _send_to_node(node, files)
        _wait_state(node, study, "waiting")  # no API key: stored, queued, held
        sr_uid = complete_with_simulated_findings(node.database_url, node.root, study, ["picky", "pacs"])
        row = _wait_state(node, study, "failed")
        series = _orthanc_series(ports["http_port"], study)
    deliveries = {d["destination"]: d for d in row["deliveries"]}
    assert deliveries["pacs"]["state"] == "sent"
    assert deliveries["picky"]["state"] == "dead" and deliveries["picky"]["attempts"] == 1
    assert "0xA900" in deliveries["picky"]["last_error"]
    assert "picky" in row["last_error"]
    assert refused == [sr_uid]
    assert any(s["MainDicomTags"]["Modality"] == "SR" for s in series)


def test_queuing_the_same_sr_again_sends_nothing_new(make_node: NodeFactory, tmp_path: Path) -> None:
    study, files = _study(tmp_path)
    with refusing_pacs(0x0000) as (port, received):
        node = make_node(
            destinations=[{"name": "pacs", "ae_title": "PICKYPACS", "host": "127.0.0.1", "port": port}]
        ).start()
        _send_to_node(node, files)
        _wait_state(node, study, "waiting")  # no API key: stored, queued, held
        first = complete_with_simulated_findings(node.database_url, node.root, study, ["pacs"])
        _wait_state(node, study, "done")
        second = complete_with_simulated_findings(node.database_url, node.root, study, ["pacs"])
        time.sleep(2)
    assert first == second and received == [first]
    assert len(node.status()[0]["deliveries"]) == 1


FAST_RETRIES = {"retry_base_seconds": 0.2, "retry_cap_seconds": 0.3, "poll_seconds": 0.1}


def test_a_processing_failure_is_retried_until_the_pacs_stores_it_once(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    study, files = _study(tmp_path)
    with refusing_pacs(0x0000, 0x0110, 0x0110) as (port, received):
        node = make_node(
            destinations=[{"name": "pacs", "ae_title": "PICKYPACS", "host": "127.0.0.1", "port": port}],
            delivery=FAST_RETRIES,
        ).start()
        _send_to_node(node, files)
        _wait_state(node, study, "waiting")
        sr_uid = complete_with_simulated_findings(node.database_url, node.root, study, ["pacs"])
        row = _wait_state(node, study, "done")
        time.sleep(1)  # long enough for a wrong extra send to show in the count
    assert received == [sr_uid] * 3  # two refusals, one store, nothing after it
    assert [(d["state"], d["attempts"]) for d in row["deliveries"]] == [("sent", 3)]


def test_a_destination_that_never_recovers_is_dead_lettered_after_max_attempts(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    study, files = _study(tmp_path)
    with refusing_pacs(0xA700) as (port, received):
        node = make_node(
            destinations=[{"name": "pacs", "ae_title": "PICKYPACS", "host": "127.0.0.1", "port": port}],
            delivery={**FAST_RETRIES, "max_attempts": 3},
        ).start()
        _send_to_node(node, files)
        _wait_state(node, study, "waiting")
        complete_with_simulated_findings(node.database_url, node.root, study, ["pacs"])
        row = _wait_state(node, study, "failed")
    (delivery,) = row["deliveries"]
    assert (delivery["state"], delivery["attempts"], len(received)) == ("dead", 3, 3)
    assert delivery["last_error"] == "gave up after 3 attempts: out of resources (0xA700)"
    assert "pacs: gave up after 3 attempts" in node.cli("status").stdout
