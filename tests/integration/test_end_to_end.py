"""The whole loop with real peers: Orthanc pushes a study, the simulator answers, Orthanc holds
one SR in that study."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.data.generate import identify, identifying_tokens, write_series
from tests.data.validators import sr_errors
from tests.nodes import Node, NodeFactory, orthanc, simulator


def _identifying_study(tmp_path: Path) -> tuple[str, list[Path]]:
    study = generate_uid()
    files = [
        *write_series(tmp_path / "axial", 30, study_instance_uid=study),
        *write_series(tmp_path / "thin", 12, study_instance_uid=study),
    ]
    identify(files)
    return study, files


def _node(make_node: NodeFactory, simulator_url: str, orthanc_ports: dict[str, int], **extra: Any) -> Node:
    """A node analysing with the simulator and sending to Orthanc, which knows it as "ainode"."""
    node = make_node(
        vision={
            "provider": "simulator",
            "base_url": simulator_url,
            "backoff_base_seconds": 0.05,
            "backoff_cap_seconds": 0.2,
            **extra.pop("vision", {}),
        },
        worker={"poll_seconds": 0.2, **extra.pop("worker", {})},
        destinations=[
            {"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_ports["dicom_port"]}
        ],
        **extra,
    ).start()
    _register(orthanc_ports["http_port"], node)
    return node


def _register(http_port: int, node: Node) -> None:
    """Tell Orthanc where the node listens (its modality "ainode")."""
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
        client.put("/modalities/ainode", json={"AET": "AINODE", "Host": "127.0.0.1", "Port": node.port})


def _push_from_orthanc(http_port: int, files: list[Path]) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as client:
        for path in files:
            client.post("/instances", content=path.read_bytes()).raise_for_status()
        (study_id,) = client.get("/studies").json()
        client.post("/modalities/ainode/store", json={"Resources": [study_id]}).raise_for_status()


def _sr_in_orthanc(http_port: int, study: str, timeout: float = 30) -> list[str]:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
        while time.monotonic() < deadline:
            (study_id,) = [
                f["ID"] for f in client.post("/tools/lookup", content=study).json() if f["Type"] == "Study"
            ]
            series = client.get(f"/studies/{study_id}/series").json()
            srs = [s for s in series if s["MainDicomTags"]["Modality"] == "SR"]
            if srs:
                instances: list[str] = srs[0]["Instances"]
                return instances
            time.sleep(0.3)
    raise TimeoutError(f"no SR in Orthanc for {study} after {timeout} s")


def _check(tmp_path: Path, node: Node, study: str, http_port: int, record: Path) -> None:
    (instance,) = _sr_in_orthanc(http_port, study)
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
        sr_bytes = client.get(f"/instances/{instance}/file").content
    sr_path = tmp_path / "from-orthanc.dcm"
    sr_path.write_bytes(sr_bytes)
    assert sr_errors(sr_path) == []
    sr = dcmread(sr_path)
    assert sr.StudyInstanceUID == study and sr.Modality == "SR"
    row = node.wait_for_state(study, "done", timeout=30)
    assert row["sr_sop_instance_uid"] == sr.SOPInstanceUID
    sent = record.read_text()
    for token in identifying_tokens():
        assert token not in sent, f"{token!r} reached the vision API"


def test_orthanc_study_comes_back_with_one_sr(make_node: NodeFactory, tmp_path: Path) -> None:
    study, files = _identifying_study(tmp_path)
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--record", str(record)) as url, orthanc(tmp_path) as ports:
        node = _node(make_node, url, ports)
        _push_from_orthanc(ports["http_port"], files)
        _check(tmp_path, node, study, ports["http_port"], record)
        # The PACS sends the same study again (a routing rule firing twice): no second SR.
        with httpx.Client(base_url=f"http://127.0.0.1:{ports['http_port']}", timeout=60) as client:
            (study_id,) = client.get("/studies").json()
            client.post("/modalities/ainode/store", json={"Resources": [study_id]}).raise_for_status()
        time.sleep(3)  # longer than the settle time
        again = node.status()[0]
        assert (again["state"], again["version"], again["instance_count"]) == ("done", 1, 42)
        assert len(_sr_in_orthanc(ports["http_port"], study)) == 1
        with httpx.Client(base_url=f"http://127.0.0.1:{node.http_port}", timeout=30) as client:
            metrics = client.get("/metrics").text
            health = client.get("/healthz")
    assert len(record.read_text().splitlines()) == 1  # one model call for the study
    for line in (
        'ainode_studies{state="done"} 1',
        "ainode_instances_received_total 42",
        'ainode_api_calls_total{provider="simulator",status="200"} 1',
        "ainode_queue_depth 0",
        'ainode_sr_deliveries{destination="pacs",state="sent"} 1',
        "ainode_api_latency_ms_count 1",
    ):
        assert line in metrics.splitlines(), line
    assert health.status_code == 200 and health.json()["destinations"] == {"pacs": "reachable"}
    with httpx.Client(base_url=f"http://127.0.0.1:{node.http_port}", timeout=30) as client:
        down = client.get("/healthz")  # Orthanc has stopped
    assert down.status_code == 503 and down.json()["destinations"]["pacs"].startswith("unreachable")


def test_429s_then_500s_from_the_api_still_end_in_one_sr(make_node: NodeFactory, tmp_path: Path) -> None:
    study, files = _identifying_study(tmp_path)
    record = tmp_path / "requests.jsonl"
    flags = ["--fail-429", "3", "--retry-after", "0.2", "--fail-500", "2", "--record", str(record)]
    with simulator(tmp_path, *flags) as url, orthanc(tmp_path) as ports:
        node = _node(make_node, url, ports)
        _push_from_orthanc(ports["http_port"], files)
        _check(tmp_path, node, study, ports["http_port"], record)
    assert len(record.read_text().splitlines()) == 6
    assert json.loads(node.cli("status", "--json").stdout)[0]["attempts"] == 1


def test_retry_makes_a_new_sr_version_naming_its_predecessor(make_node: NodeFactory, tmp_path: Path) -> None:
    study, files = _identifying_study(tmp_path)
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--record", str(record)) as url, orthanc(tmp_path) as ports:
        node = _node(make_node, url, ports)
        _push_from_orthanc(ports["http_port"], files)
        first = node.wait_for_state(study, "done", timeout=30)["sr_sop_instance_uid"]
        assert "queued again as version 2" in node.cli("retry", study).stdout
        row = node.wait_for_state(study, "done", timeout=30)
        assert row["version"] == 2 and row["sr_sop_instance_uid"] != first
        deadline = time.monotonic() + 20
        while len(_sr_in_orthanc(ports["http_port"], study)) < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        instances = _sr_in_orthanc(ports["http_port"], study)
        assert len(instances) == 2  # same SR series, a second instance
        with httpx.Client(base_url=f"http://127.0.0.1:{ports['http_port']}", timeout=30) as client:
            tags = [client.get(f"/instances/{i}/simplified-tags").json() for i in instances]
    newest = next(t for t in tags if t["SOPInstanceUID"] == row["sr_sop_instance_uid"])
    assert (
        newest["PredecessorDocumentsSequence"][0]["ReferencedSeriesSequence"][0]["ReferencedSOPSequence"][0][
            "ReferencedSOPInstanceUID"
        ]
        == first
    )
    assert len(record.read_text().splitlines()) == 2
    missing = node.cli("retry", "1.2.3.4.5", check=False)
    assert missing.returncode == 1 and "no study 1.2.3.4.5" in missing.stderr
