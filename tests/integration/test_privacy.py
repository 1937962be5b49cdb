"""Nothing identifying leaves the hospital: a study full of identifying headers goes through
preparation and the real client to a local server that records every byte it receives."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from pydicom import dcmread
from pydicom.uid import generate_uid

from analysis.errors import VisionRetryable
from analysis.vision.client import VisionClient
from conf import ImagingSettings, VisionSettings
from storage.disclosures import DisclosureLog
from tests.data.generate import identify, identifying_tokens, write_series
from tests.data.ingest import prepared_study
from tests.nodes import NodeFactory, dcmtk, simulator


def test_no_identifying_header_reaches_the_vision_api(tmp_path: Path) -> None:
    study = generate_uid()
    files = [
        *write_series(tmp_path / "ct", 20, study_instance_uid=study),
        *write_series(tmp_path / "cr", 1, source="RG1_UNCI.dcm", study_instance_uid=study),
        *write_series(tmp_path / "us", 1, source="US1_UNCI.dcm", study_instance_uid=study),
    ]
    identify(files)
    # The ultrasound has no BurnedInAnnotation: sent only because this site masks US.
    prepared, _ = prepared_study(files, tmp_path, ImagingSettings(unlabelled_burned_in={"US": "mask"}))
    assert len(prepared.encoded) == 4  # the head CT in brain and subdural windows, CR, US

    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--record", str(record)) as base_url:
        settings = VisionSettings(provider="simulator", base_url=base_url, api_key=SecretStr("sk-x"))
        with VisionClient(settings) as vision:
            result = vision.analyse(study, prepared.encoded, prepared.prompt)
    assert result.findings.summary.startswith("SIMULATED")

    (line,) = record.read_text().splitlines()
    body = json.loads(line)
    sent_images = [
        part["image_url"]["url"] for part in body["messages"][1]["content"] if part["type"] == "image_url"
    ]
    assert [base64.b64decode(u.split(",", 1)[1]) for u in sent_images] == [e.data for e in prepared.encoded]
    text = json.dumps([m for m in body["messages"]]).lower()
    text = re.sub(r'"url": "data:image/jpeg;base64,[^"]*"', "", text)  # pixels are checked above
    for token in identifying_tokens():
        assert token.lower() not in text, f"{token!r} reached the vision API"
    assert study not in text  # not even the Study Instance UID
    for path in files:  # nor any UID of the source instances
        assert str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) not in text


def _sent_images(body: dict[str, Any]) -> list[bytes]:
    return [
        base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
        for message in body["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    ]


def test_every_disclosure_is_recorded_before_it_leaves_and_matches_the_bytes_sent(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    """The audit trail (issue 13): each request to the vision API has a line in the append-only
    audit log and a row in the database, whose hashes and size are those of the bytes the
    server received, whose prompt and images are those `ainode preview` shows, and which holds
    nothing identifying. Two requests here: the simulator's first reply is unusable, so the
    client asks again (a second disclosure)."""
    study = generate_uid()
    files = write_series(tmp_path / "ct", 12, study_instance_uid=study)
    identify(files)
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--record", str(record), "--malformed", "1") as url:
        node = make_node(
            vision={"provider": "simulator", "base_url": url}, worker={"poll_seconds": 0.2}
        ).start()
        sent = dcmtk("storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files))
        assert sent.returncode == 0, sent.stderr
        row = node.wait_for_state(study, "done", timeout=60)
    received = [line.encode("utf-8") for line in record.read_text().splitlines()]
    assert len(received) == 2
    audit_lines = (node.root / "audit" / "disclosures.jsonl").read_text().splitlines()
    audit = [json.loads(line) for line in audit_lines]
    assert [a["request_sha256"] for a in audit] == [hashlib.sha256(body).hexdigest() for body in received]
    assert [a["request_bytes"] for a in audit] == [len(body) for body in received]
    for entry, body in zip(audit, received, strict=True):
        images = _sent_images(json.loads(body))
        assert entry["image_sha256"] == [hashlib.sha256(image).hexdigest() for image in images]
        assert (entry["study_instance_uid"], entry["provider"], entry["endpoint_host"]) == (
            study,
            "simulator",
            "127.0.0.1",
        )
    # The same images and prompt `ainode preview` writes for the study.
    preview = tmp_path / "preview"
    node.cli("preview", study, "--out", str(preview))
    manifest = json.loads((preview / "manifest.json").read_text())
    assert audit[0]["image_sha256"] == [image["sha256"] for image in manifest["images"]]
    assert audit[0]["prompt_sha256"] == manifest["prompt_sha256"]
    assert manifest["prompt_sha256"] == hashlib.sha256((preview / "prompt.txt").read_bytes()[:-1]).hexdigest()
    # The database holds the same facts, shown by `ainode status --json` and `ainode disclosures`.
    shown = [{k: v for k, v in d.items() if k != "status"} for d in row["disclosures"]]
    assert shown == audit
    exported = [json.loads(line) for line in node.cli("disclosures", "--study", study).stdout.splitlines()]
    assert [{k: v for k, v in d.items() if k != "status"} for d in exported] == audit
    assert [d["status"] for d in exported] == [200, 200]
    trail = "\n".join(audit_lines)
    for token in identifying_tokens():
        assert token not in trail


def test_no_request_leaves_when_its_disclosure_cannot_be_recorded(tmp_path: Path) -> None:
    study = generate_uid()
    files = write_series(tmp_path / "ct", 4, study_instance_uid=study)
    prepared, _ = prepared_study(files, tmp_path)
    blocked = tmp_path / "root"
    blocked.mkdir()
    (blocked / "audit").write_text("a file where the audit folder should be")
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--record", str(record)) as base_url:
        settings = VisionSettings(provider="simulator", base_url=base_url, max_retries=0)
        with (
            VisionClient(settings, disclosures=DisclosureLog(blocked)) as vision,
            pytest.raises(VisionRetryable, match="cannot record the disclosure") as failed,
        ):
            vision.analyse(study, prepared.encoded, prepared.prompt)
    assert not record.exists() or record.read_text() == ""  # nothing was sent
    assert getattr(failed.value, "calls", []) == []  # and no call is counted as made


def _us_with_device(tmp_path: Path, manufacturer: str, model: str) -> tuple[str, list[Path]]:
    study = generate_uid()
    files = write_series(tmp_path / "us", 1, source="US1_UNCI.dcm", study_instance_uid=study)
    ds = dcmread(files[0])
    ds.Manufacturer, ds.ManufacturerModelName = manufacturer, model
    ds.save_as(files[0])
    return study, files


def test_an_ultrasound_without_burned_in_annotation_never_leaves_unmasked(tmp_path: Path) -> None:
    """Default: not sent at all. Masked: the text region deid's rule set knows for the device
    (GE LOGIQ E9: the top 70 rows) is black in what is sent, and the rest of the image is not."""
    _, files = _us_with_device(tmp_path / "a", "GE Healthcare", "LOGIQE9")
    default, _ = prepared_study(files, tmp_path / "a")
    assert default.encoded == []
    assert next(e.reason for e in default.exclusions).startswith("US without BurnedInAnnotation NO")
    masked, _ = prepared_study(
        files, tmp_path / "b", ImagingSettings(unlabelled_burned_in={"US": "mask"}, mask_top_fraction=0)
    )
    (tile,) = masked.composed[0].tiles
    shown = masked.composed[0].pixels
    scale = tile.scale
    band = shown[tile.y0 : tile.y0 + int(70 * scale) - 1, tile.x0 : tile.x0 + tile.width]
    below = shown[tile.y0 + int(80 * scale) : tile.y0 + tile.height, tile.x0 : tile.x0 + tile.width]
    assert band.max() == 0  # the device's text band, black
    assert below.max() > 0  # the anatomy is still there
    # A device no rule knows gets the fixed top band instead.
    _, unknown = _us_with_device(tmp_path / "c", "Acme Sonics", "Echo 1")
    banded, _ = prepared_study(unknown, tmp_path / "c", ImagingSettings(unlabelled_burned_in={"US": "mask"}))
    (tile,) = banded.composed[0].tiles
    top = banded.composed[0].pixels[
        tile.y0 : tile.y0 + int(tile.height * 0.22) - 1, tile.x0 : tile.x0 + tile.width
    ]
    assert top.max() == 0


def test_a_screen_the_rule_set_blacklists_is_never_sent_even_when_masking(tmp_path: Path) -> None:
    study = generate_uid()
    files = write_series(tmp_path / "sc", 1, source="SC_rgb.dcm", study_instance_uid=study)
    ds = dcmread(files[0])
    ds.ImageType = ["DERIVED", "SECONDARY", "REPORTDATA"]
    ds.save_as(files[0])
    prepared, _ = prepared_study(
        files, tmp_path, ImagingSettings(unlabelled_burned_in={"OT": "mask", "SC": "mask"})
    )
    assert prepared.encoded == []
