"""Nothing identifying leaves the hospital: a study full of identifying headers goes through
preparation and the real client to a local server that records every byte it receives."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from pydantic import SecretStr
from pydicom import dcmread
from pydicom.uid import generate_uid

from analysis.vision.client import VisionClient
from conf import VisionSettings
from tests.data.generate import identify, identifying_tokens, write_series
from tests.data.ingest import prepared_study
from tests.nodes import simulator


def test_no_identifying_header_reaches_the_vision_api(tmp_path: Path) -> None:
    study = generate_uid()
    files = [
        *write_series(tmp_path / "ct", 20, study_instance_uid=study),
        *write_series(tmp_path / "cr", 1, source="RG1_UNCI.dcm", study_instance_uid=study),
        *write_series(tmp_path / "us", 1, source="US1_UNCI.dcm", study_instance_uid=study),
    ]
    identify(files)
    prepared, _ = prepared_study(files, tmp_path)
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
