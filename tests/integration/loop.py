"""The loop a site runs: Orthanc pushes a study, the node analyses it with the simulator and
sends the SR back into Orthanc. Helpers shared by the end-to-end tests."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
from pydicom import dcmread
from pydicom.uid import generate_uid

from analysis.summary_image import SERIES_DESCRIPTION as SUMMARY_SERIES
from tests.data.generate import identify, identifying_tokens, write_series
from tests.data.validators import sr_errors
from tests.nodes import Node, NodeFactory


def identifying_study(tmp_path: Path) -> tuple[str, list[Path]]:
    study = generate_uid()
    files = [
        *write_series(tmp_path / "axial", 30, study_instance_uid=study),
        *write_series(tmp_path / "thin", 12, study_instance_uid=study),
    ]
    identify(files)
    return study, files


def node_with_orthanc(
    make_node: NodeFactory,
    simulator_url: str,
    orthanc_ports: dict[str, int],
    env: dict[str, str] | None = None,
    outputs: tuple[str, ...] = ("sr", "sc"),
    **extra: Any,
) -> Node:
    """A node analysing with the simulator and sending to Orthanc, which knows it as "ainode".
    ``extra`` sections override the defaults (``vision={"provider": "openai"}`` keeps the
    simulator's URL); ``env`` is added to the node's environment."""
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
            {
                "name": "pacs",
                "ae_title": "ORTHANC",
                "host": "127.0.0.1",
                "port": orthanc_ports["dicom_port"],
                "outputs": list(outputs),
            }
        ],
        **extra,
    ).start(env=env)
    register(orthanc_ports["http_port"], node)
    return node


def register(http_port: int, node: Node) -> None:
    """Tell Orthanc where the node listens (its modality "ainode")."""
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
        client.put("/modalities/ainode", json={"AET": "AINODE", "Host": "127.0.0.1", "Port": node.port})


def push_from_orthanc(http_port: int, files: list[Path]) -> None:
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as client:
        for path in files:
            client.post("/instances", content=path.read_bytes()).raise_for_status()
        (study_id,) = client.get("/studies").json()
        client.post("/modalities/ainode/store", json={"Resources": [study_id]}).raise_for_status()


def sr_in_orthanc(http_port: int, study: str, timeout: float = 30) -> list[str]:
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


def check_sr(tmp_path: Path, node: Node, study: str, http_port: int, record: Path) -> None:
    (instance,) = sr_in_orthanc(http_port, study)
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
        sr_bytes = client.get(f"/instances/{instance}/file").content
    sr_path = tmp_path / "from-orthanc.dcm"
    sr_path.write_bytes(sr_bytes)
    assert sr_errors(sr_path) == []
    sr = dcmread(sr_path)
    assert sr.StudyInstanceUID == study and sr.Modality == "SR"
    row = node.wait_for_state(study, "done", timeout=30)
    assert row["sr_sop_instance_uid"] == sr.SOPInstanceUID
    # The evidence is the whole analysed instance set (PS3.3 C.17.2), not only the images shown.
    evidence = {
        sop.ReferencedSOPInstanceUID
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert len(evidence) == row["instance_count"]
    sent = record.read_text()
    for token in identifying_tokens():
        assert token not in sent, f"{token!r} reached the vision API"


def check_summary_image(tmp_path: Path, http_port: int, study: str) -> None:
    """The Secondary Capture summary arrived in the study, in its own series, valid in dciodvfy."""
    with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=30) as client:
        (study_id,) = [
            f["ID"] for f in client.post("/tools/lookup", content=study).json() if f["Type"] == "Study"
        ]
        series = client.get(f"/studies/{study_id}/series").json()
        (summary,) = [s for s in series if s["MainDicomTags"].get("SeriesDescription") == SUMMARY_SERIES]
        (instance,) = summary["Instances"]
        path = tmp_path / "summary-from-orthanc.dcm"
        path.write_bytes(client.get(f"/instances/{instance}/file").content)
    check = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60
    )
    assert [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")] == []
    image = dcmread(path)
    assert image.StudyInstanceUID == study and image.pixel_array.shape == (1024, 1280, 3)
