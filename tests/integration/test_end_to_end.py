"""The whole loop with real peers: Orthanc pushes a study, the simulator answers, Orthanc holds
one SR in that study."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydicom import dcmread

from tests.integration.loop import (
    check_sr,
    check_summary_image,
    identifying_study,
    node_with_orthanc,
    push_from_orthanc,
    sr_in_orthanc,
)
from tests.nodes import NodeFactory, orthanc, simulator


def test_orthanc_study_comes_back_with_one_sr(make_node: NodeFactory, tmp_path: Path) -> None:
    study, files = identifying_study(tmp_path)
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--record", str(record)) as url, orthanc(tmp_path) as ports:
        node = node_with_orthanc(make_node, url, ports)
        push_from_orthanc(ports["http_port"], files)
        check_sr(tmp_path, node, study, ports["http_port"], record)
        # The PACS sends the same study again (a routing rule firing twice): no second SR.
        with httpx.Client(base_url=f"http://127.0.0.1:{ports['http_port']}", timeout=60) as client:
            (study_id,) = client.get("/studies").json()
            client.post("/modalities/ainode/store", json={"Resources": [study_id]}).raise_for_status()
        time.sleep(3)  # longer than the settle time
        again = node.status()[0]
        assert (again["state"], again["version"], again["instance_count"]) == ("done", 1, 42)
        assert len(sr_in_orthanc(ports["http_port"], study)) == 1
        check_summary_image(tmp_path, ports["http_port"], study)
        with httpx.Client(base_url=f"http://127.0.0.1:{node.http_port}", timeout=30) as client:
            metrics = client.get("/metrics").text
            health = client.get("/healthz")
    assert len(record.read_text().splitlines()) == 1  # one model call for the study
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics)
        for s in family.samples
    }
    for name, labels, value in (
        ("ainode_studies", {"state": "done"}, 1),
        ("ainode_instances_received_total", {}, 42),
        ("ainode_api_calls_total", {"provider": "simulator", "status": "200"}, 1),
        ("ainode_queue_depth", {}, 0),
        ("ainode_sr_deliveries", {"destination": "pacs", "state": "sent"}, 2),  # the SR and the summary
        ("ainode_api_latency_ms_count", {}, 1),
    ):
        assert samples[(name, tuple(sorted(labels.items())))] == value, name
    assert health.status_code == 200 and health.json()["destinations"] == {"pacs": "reachable"}
    with httpx.Client(base_url=f"http://127.0.0.1:{node.http_port}", timeout=30) as client:
        down = client.get("/healthz")  # Orthanc has stopped
    assert down.status_code == 503 and down.json()["destinations"]["pacs"].startswith("unreachable")


def test_429s_then_500s_from_the_api_still_end_in_one_sr(make_node: NodeFactory, tmp_path: Path) -> None:
    study, files = identifying_study(tmp_path)
    record = tmp_path / "requests.jsonl"
    flags = ["--fail-429", "3", "--retry-after", "0.2", "--fail-500", "2", "--record", str(record)]
    with simulator(tmp_path, *flags) as url, orthanc(tmp_path) as ports:
        node = node_with_orthanc(make_node, url, ports)
        push_from_orthanc(ports["http_port"], files)
        check_sr(tmp_path, node, study, ports["http_port"], record)
    assert len(record.read_text().splitlines()) == 6
    assert json.loads(node.cli("status", "--json").stdout)[0]["attempts"] == 1


def test_retry_makes_a_new_sr_version_naming_its_predecessor(make_node: NodeFactory, tmp_path: Path) -> None:
    study, files = identifying_study(tmp_path)
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--record", str(record)) as url, orthanc(tmp_path) as ports:
        node = node_with_orthanc(make_node, url, ports)
        push_from_orthanc(ports["http_port"], files)
        first = node.wait_for_state(study, "done", timeout=30)["sr_sop_instance_uid"]
        assert "queued again as version 2" in node.cli("retry", study).stdout
        row = node.wait_for_state(study, "done", timeout=30)
        assert row["version"] == 2 and row["sr_sop_instance_uid"] != first
        deadline = time.monotonic() + 20
        while len(sr_in_orthanc(ports["http_port"], study)) < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        instances = sr_in_orthanc(ports["http_port"], study)
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


def test_key_images_and_regions_on_the_original_images_reach_orthanc(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """A destination asking for "kos" and "gsps" gets, beside the SR, a Key Object Selection
    flagging the images with regions and a presentation state drawing them, both in the study,
    valid in dciodvfy, pointing at images Orthanc holds, and sent once."""
    study, files = identifying_study(tmp_path)
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--record", str(record)) as url, orthanc(tmp_path) as ports:
        node = node_with_orthanc(make_node, url, ports, outputs=("sr", "kos", "gsps"))
        push_from_orthanc(ports["http_port"], files)
        check_sr(tmp_path, node, study, ports["http_port"], record)
        row = node.wait_for_state(study, "done", timeout=30)
        assert sorted(d["state"] for d in row["deliveries"]) == ["sent"] * 3
        with httpx.Client(base_url=f"http://127.0.0.1:{ports['http_port']}", timeout=30) as client:
            (study_id,) = [
                f["ID"] for f in client.post("/tools/lookup", content=study).json() if f["Type"] == "Study"
            ]
            series = client.get(f"/studies/{study_id}/series").json()
            by_modality = {s["MainDicomTags"]["Modality"]: s for s in series}
            assert set(by_modality) == {"CT", "SR", "KO", "PR"}  # no summary image: not asked for
            held = {
                client.get(f"/instances/{i}").json()["MainDicomTags"]["SOPInstanceUID"]
                for s in series
                if s["MainDicomTags"]["Modality"] == "CT"
                for i in s["Instances"]
            }
            objects = {}
            for modality in ("KO", "PR"):
                (instance,) = by_modality[modality]["Instances"]
                path = tmp_path / f"{modality}-from-orthanc.dcm"
                path.write_bytes(client.get(f"/instances/{instance}/file").content)
                check = subprocess.run(
                    ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60
                )
                assert [
                    line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")
                ] == []
                objects[modality] = dcmread(path)
    flagged = {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in objects["KO"].ContentSequence
        if item.ValueType == "IMAGE"
    }
    drawn = {
        str(annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
        for annotation in objects["PR"].GraphicAnnotationSequence
    }
    assert flagged and flagged <= held and drawn == flagged
    assert all(o.StudyInstanceUID == study for o in objects.values())
    assert "SIMULATED" in objects["PR"].ContentDescription
