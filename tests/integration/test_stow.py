"""Delivery by DICOMweb STOW-RS: to a real Orthanc with its DICOMweb plugin (Debian
orthanc-dicomweb), read back over WADO-RS; and what each kind of answer means for a delivery."""

from __future__ import annotations

import email.parser
import email.policy
import io
import json
from pathlib import Path

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from conf import DestinationSettings, Settings
from conf.settings import ConfigError, load_settings
from scp.stow import classify, stow_instance
from tests.data.generate import write_series
from tests.data.sr import complete_with_simulated_findings
from tests.data.validators import sr_errors
from tests.nodes import NodeFactory, dcmtk, free_port, orthanc, write_config

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
PATIENT = "Müller^Jürgen"  # non-ASCII: the SR carries it in UTF-8 (ISO_IR 192)


def _wado_instance(base: str, study: str, series: str, sop: str) -> bytes:
    """One instance over WADO-RS (PS3.18 10.4), the Part 10 bytes out of its multipart answer."""
    with httpx.Client(timeout=30) as client:
        answer = client.get(
            f"{base}/studies/{study}/series/{series}/instances/{sop}",
            headers={"Accept": 'multipart/related; type="application/dicom"'},
        )
    answer.raise_for_status()
    head = f"Content-Type: {answer.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + answer.content)
    (part,) = [p for p in message.iter_parts() if p.get_content_type() == "application/dicom"]
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


def test_the_sr_reaches_orthanc_by_stow_rs_with_its_text_intact(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    study = generate_uid()
    files = write_series(tmp_path / "ct", 4, study_instance_uid=study)
    for path in files:  # a patient name only UTF-8 can carry, as the SR must keep it
        ds = dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = PATIENT
        ds.save_as(path)
    with orthanc(
        tmp_path, Plugins=[DICOMWEB_PLUGIN], DicomWeb={"Enable": True, "Root": "/dicom-web/"}
    ) as ports:
        base = f"http://127.0.0.1:{ports['http_port']}/dicom-web"
        node = make_node(destinations=[{"name": "web", "stow_url": base}]).start()
        sent = dcmtk("storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files))
        assert sent.returncode == 0, sent.stderr
        node.wait_for_state(study, "waiting")  # no API key: stored, queued, held
        sr_uid = complete_with_simulated_findings(node.database_url, node.root, study, ["web"])
        row = node.wait_for_state(study, "done", timeout=60)
        assert [(d["destination"], d["state"], d["attempts"]) for d in row["deliveries"]] == [
            ("web", "sent", 1)
        ]
        (local,) = (node.root / "sr").rglob("*.dcm")
        kept = dcmread(local)
        fetched_bytes = _wado_instance(base, study, str(kept.SeriesInstanceUID), sr_uid)
    fetched = dcmread(io.BytesIO(fetched_bytes))
    assert fetched.SOPInstanceUID == sr_uid and fetched.StudyInstanceUID == study
    assert str(fetched.PatientName) == PATIENT
    assert fetched.ContentSequence == kept.ContentSequence  # the findings' words, as written
    assert sr_errors(local) == []


def _failed(reason: int) -> bytes:
    """A STOW-RS answer whose Failed SOP Sequence holds one item with ``reason``."""
    item = {"00081197": {"vr": "US", "Value": [reason]}}
    return json.dumps({"00081198": {"vr": "SQ", "Value": [item]}}).encode()


@pytest.mark.parametrize(
    ("status_code", "body", "kind"),
    [
        (200, b"", "sent"),
        (202, b"{}", "sent"),  # warnings, our instance not among the failed
        (202, b'{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [49152]}}]}}', "dead"),
        (
            409,
            b'[{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [42752]}}]}}]',
            "retry",
        ),
        (409, b'{"00081198": {"vr": "SQ", "Value": [{"00081197": {"vr": "US", "Value": [272]}}]}}', "retry"),
        (409, b"not json", "dead"),
        (503, b"", "retry"),
        (429, b"", "retry"),
        (408, b"", "retry"),
        (400, b"", "dead"),
        (401, b"", "dead"),
        (404, b"<html>", "dead"),
        (415, b"", "dead"),
    ],
)
def test_stow_rs_answers_are_classified(status_code: int, body: bytes, kind: str) -> None:
    assert classify(status_code, body, "1.2.3").kind == kind


def test_an_unreachable_stow_url_is_retried_and_its_credentials_are_never_shown(tmp_path: Path) -> None:
    (sr,) = write_series(tmp_path / "one", 1)
    port = free_port()  # nothing listens there
    destination = DestinationSettings(
        name="web", stow_url=f"http://ainode:s3cret-pw@127.0.0.1:{port}/dicom-web"
    )
    answer = stow_instance(sr, destination, "1.2.3", "1.2.3.4", timeout=5)
    assert answer.kind == "retry" and "cannot reach" in answer.detail
    assert "s3cret-pw" not in answer.detail and "s3cret-pw" not in destination.describe()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"name": "web"}, 'destination "web" needs ae_title, host, port'),
        (
            {"name": "web", "stow_url": "http://127.0.0.1/dicom-web", "ae_title": "PACS"},
            "has both stow_url and ae_title/host/port",
        ),
        ({"name": "web", "stow_url": "ftp://user:s3cret-pw@host/x"}, "must be an http:// or https:// URL"),
    ],
)
def test_a_destination_is_either_dimse_or_stow_rs(
    tmp_path: Path, table: dict[str, object], message: str
) -> None:
    config = write_config(tmp_path / "ainode.toml", {"destinations": [table]})
    with pytest.raises(ConfigError, match=message) as raised:
        load_settings(config)
    assert "s3cret-pw" not in str(raised.value)
    assert Settings().destinations == ()
