"""``ainode preview`` on a study received over DICOM: exactly what the model would get."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.data.generate import identify, identifying_tokens, write_series
from tests.nodes import NodeFactory, dcmtk


def test_preview_writes_images_prompt_and_manifest_without_identifying_text(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    study = generate_uid()
    files = [
        *write_series(tmp_path / "ct", 40, study_instance_uid=study),
        *write_series(tmp_path / "cr", 1, source="RG1_UNCI.dcm", study_instance_uid=study),
        *write_series(tmp_path / "us", 1, source="US1_UNCI.dcm", study_instance_uid=study),
    ]
    localizer = write_series(tmp_path / "loc", 1, study_instance_uid=study)[0]
    ds = dcmread(localizer)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(localizer)
    identify([*files, localizer])
    node = make_node().start()
    sent = dcmtk("storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, [*files, localizer]))
    assert sent.returncode == 0, sent.stderr

    out = tmp_path / "preview"
    result = node.cli("preview", study, "--out", str(out))
    # The 40-slice head CT (its header's brain window says so) in brain and subdural windows, each
    # two mosaics of 1.25 mm slabs (the default budget affords single-slice slabs here); CR. The
    # ultrasound has no BurnedInAnnotation: left out by default (issue 13).
    assert "5 image(s) for the model" in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert [image["kind"] for image in manifest["images"]] == ["volume"] * 4 + ["single"]
    for image in manifest["images"]:
        data = (out / image["file"]).read_bytes()
        assert data[:3] == b"\xff\xd8\xff"  # JPEG
        assert hashlib.sha256(data).hexdigest() == image["sha256"] and len(data) == image["bytes"]
    ct = manifest["images"][0]
    assert ct["window"] == "brain window (C 40, W 80)" and ct["projection"] == "average intensity projection"
    assert ct["tiles"][0]["window"]["explanation"].startswith("preset brain (head: the header's window")
    for window in ("brain window (C 40, W 80)", "subdural window (C 75, W 215)"):
        shown = [
            uid
            for image in manifest["images"]
            if image.get("window") == window
            for tile in image["tiles"]
            for uid in tile["slab"]["sop_instance_uids"]
        ]
        assert len(shown) == len(set(shown)) == 40  # every slice once in each window
    reasons = {e["reason"] for e in manifest["excluded"]}
    assert reasons == {
        "localizer",
        "US without BurnedInAnnotation NO (may show patient data; imaging.unlabelled_burned_in)",
    }
    prompt = (out / "prompt.txt").read_text()
    assert (
        "the slabs together cover every slice of the series (40)" in prompt
        and "CR, body part CHEST" in prompt
    )
    everything_sent = prompt + json.dumps(manifest)
    for token in identifying_tokens():
        assert token not in everything_sent, f"{token!r} leaked into what the model gets"


def test_preview_of_an_unknown_study_says_so(make_node: NodeFactory) -> None:
    node = make_node()
    result = node.cli("preview", "1.2.3.4", "--out", str(node.workdir / "out"), check=False)
    assert result.returncode == 1 and "no study 1.2.3.4" in result.stderr


def test_images_past_the_request_byte_limit_are_left_out_with_the_reason(
    make_node: NodeFactory, tmp_path: Path
) -> None:
    study = generate_uid()
    files = [
        *write_series(tmp_path / "cr1", 1, source="RG1_UNCI.dcm", study_instance_uid=study),
        *write_series(tmp_path / "cr2", 1, source="RG3_UNCI.dcm", study_instance_uid=study),
    ]
    node = make_node(imaging={"max_bytes_per_request": 100_000}).start()
    assert dcmtk("storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), *map(str, files)).returncode == 0
    out = tmp_path / "preview"
    node.cli("preview", study, "--out", str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["images"]) == 1 and manifest["images"][0]["bytes"] <= 100_000
    assert [e["reason"] for e in manifest["excluded"]] == [
        "over imaging.max_bytes_per_request (100000 bytes)"
    ]
