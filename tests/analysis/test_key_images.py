"""The Key Object Selection document and the Grayscale Softcopy Presentation State: each flags or
draws exactly the regions the model placed (never a pertinent negative), in the model's words,
labelled AI and unverified, and each is valid in dciodvfy (the KOS also in dsrdump and PixelMed)."""

from __future__ import annotations

import dataclasses
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from analysis.findings import Findings
from analysis.key_images import build_key_images
from analysis.mosaic import ComposedImage
from analysis.presentation_state import build_presentation_state
from analysis.regions import place_findings
from analysis.uids import UidMaker
from analysis.vision.reading import read_findings
from tests.analysis.test_report import prepared
from tests.analysis.test_summary_image import _reply
from tests.data.validators import saved_and_valid

UIDS = UidMaker(uuid.uuid4())
Study = tuple[Findings, list[ComposedImage], dict[str, Dataset]]


def _windowed(sources: dict[str, Dataset], window: tuple[float, float] | None) -> dict[str, Dataset]:
    """Copies of the headers with that window (None: with no window at all)."""
    copies = {}
    for uid, header in sources.items():
        copy = Dataset(header)
        copy.file_meta = header.file_meta
        for keyword in ("WindowCenter", "WindowWidth"):
            if keyword in copy:
                delattr(copy, keyword)
        if window is not None:
            copy.WindowCenter, copy.WindowWidth = window
        copies[uid] = copy
    return copies


def _dciodvfy_errors(path: Path) -> list[str]:
    check = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60
    )
    return [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    tmp = tmp_path_factory.mktemp("key")
    study_prep, sources, _ = prepared(tmp, "CT_small.dcm", 12)
    sizes = [(image.width, image.height) for image in study_prep.encoded]
    reply = _reply(sizes)
    # The uncertain finding on another image than the mass, so two images are flagged.
    reply["findings"][1]["image_index"] = len(sizes)  # type: ignore[index]
    return read_findings(reply, sizes, "fraction"), study_prep.composed, sources


def test_the_key_object_selection_flags_the_images_with_regions(
    study: Study,
    tmp_path: Path,
) -> None:
    findings, composed, sources = study
    placed = place_findings(findings, composed)
    expected = sorted({p.region.sop_instance_uid for p in placed if p.region is not None})
    assert len(expected) >= 1
    document = build_key_images(placed, sources, UIDS, 1, "model-x", "prompt-1")
    assert document is not None
    written = saved_and_valid(document, tmp_path / "kos.dcm")
    flagged = sorted(
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in written.ContentSequence
        if item.ValueType == "IMAGE"
    )
    assert flagged == expected
    (description,) = [item.TextValue for item in written.ContentSequence if item.ValueType == "TEXT"]
    assert "UNVERIFIED" in description
    assert "2 cm spiculated mass" in description and "Possible small left effusion" in description
    assert "pneumothorax" not in description.lower()  # a pertinent negative flags nothing
    assert written.SeriesDescription == "AI key images - UNVERIFIED"
    assert written.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
    again = build_key_images(placed, sources, UIDS, 1, "model-x", "prompt-1")
    assert again is not None and again.SOPInstanceUID == document.SOPInstanceUID  # same input, same UID


def test_the_presentation_state_draws_each_region_on_its_source_image(
    study: Study,
    tmp_path: Path,
) -> None:
    findings, composed, sources = study
    placed = [p for p in place_findings(findings, composed) if p.region is not None]
    windowed = _windowed(sources, (40.0, 400.0))
    # The window the model saw is for images whose header has none: not these.
    state = build_presentation_state(
        placed, windowed, {uid: (1.0, 2.0) for uid in sources}, UIDS, 1, "m", "p"
    )
    assert state is not None
    path = tmp_path / "gsps.dcm"
    state.save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    written = dcmread(path)
    drawn: dict[str, list[np.ndarray]] = {}
    labels: list[str] = []
    for annotation in written.GraphicAnnotationSequence:
        uid = str(annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
        for graphic in annotation.GraphicObjectSequence:
            drawn.setdefault(uid, []).append(np.array(graphic.GraphicData, dtype=float).reshape(-1, 2))
        labels += [str(text.UnformattedTextValue) for text in annotation.TextObjectSequence]
    assert sum(len(v) for v in drawn.values()) == len(placed) == 2  # the absent finding is not drawn
    for item in placed:
        assert item.region is not None
        corners = np.array(item.region.corners(), dtype=float)
        assert any(
            np.allclose(polyline, corners, atol=0.01) for polyline in drawn[item.region.sop_instance_uid]
        )
    assert any(label.startswith("1. AI (unverified): 2 cm spiculated mass") for label in labels)
    assert any(
        label.startswith("2. AI, uncertain (unverified): Possible small left effusion") for label in labels
    )
    assert written.SeriesDescription == "AI regions - UNVERIFIED"
    # The images' own window, as their headers give it.
    assert {(float(v.WindowCenter), float(v.WindowWidth)) for v in written.SoftcopyVOILUTSequence} == {
        (40.0, 400.0)
    }


def test_without_a_header_window_the_state_uses_the_window_the_model_saw(
    study: Study,
    tmp_path: Path,
) -> None:
    findings, composed, sources = study
    placed = place_findings(findings, composed)
    bare = _windowed(sources, None)
    windows = {uid: (-600.0, 1500.0) for uid in bare}
    state = build_presentation_state(placed, bare, windows, UIDS, 1, "model-x", "prompt-1")
    assert state is not None
    assert {(float(v.WindowCenter), float(v.WindowWidth)) for v in state.SoftcopyVOILUTSequence} == {
        (-600.0, 1500.0)
    }


def test_nothing_placed_means_no_key_images_and_no_presentation_state(
    study: Study,
) -> None:
    _, composed, sources = study
    unplaced = Findings.model_validate(
        {"summary": "Normal.", "findings": [{"description": "No nodule", "assertion": "absent"}]}
    )
    placed = place_findings(unplaced, composed)
    assert placed == []
    assert build_key_images(placed, sources, UIDS, 1, "m", "p") is None
    assert build_presentation_state(placed, sources, {}, UIDS, 1, "m", "p") is None


def test_the_models_words_in_any_script_survive_in_both_and_stay_valid(
    study: Study,
    tmp_path: Path,
) -> None:
    """Non-Latin text, a backslash and a newline in a finding: the KOS description and the GSPS
    labels carry the words as the model wrote them (no replacement characters; a label's backslash,
    which its VR's builder refuses, as a slash), declared in UTF-8, and both are made and stay
    valid in dciodvfy."""
    findings, composed, sources = study
    words = "Nodule 结节 / узел, right\\upper lobe\nnext line é"
    placed = [
        dataclasses.replace(p, finding=p.finding.model_copy(update={"description": words}))
        for p in place_findings(findings, composed)
    ]
    kos = build_key_images(placed, sources, UIDS, 1, "m", "p")
    gsps = build_presentation_state(placed, sources, {}, UIDS, 1, "m", "p")
    assert kos is not None and gsps is not None
    one_line = " ".join(words.split())
    for name, document in (("kos", kos), ("gsps", gsps)):
        path = tmp_path / f"{name}.dcm"
        document.save_as(path, enforce_file_format=True)  # warnings are errors here: no "?" for 结节
        assert _dciodvfy_errors(path) == []
        written = dcmread(path)
        assert written.SpecificCharacterSet == "ISO_IR 192"
        if name == "kos":
            (text,) = [item.TextValue for item in written.ContentSequence if item.ValueType == "TEXT"]
        else:
            text = "\n".join(
                str(t.UnformattedTextValue)
                for a in written.GraphicAnnotationSequence
                for t in a.TextObjectSequence
            )
        assert (one_line if name == "kos" else one_line.replace("\\", "/")) in text


def test_a_region_on_a_colour_image_leaves_the_others_drawn(study: Study, tmp_path: Path) -> None:
    """A grayscale presentation state cannot reference an RGB image (an ultrasound, a screen
    capture): the regions on grayscale images are still drawn, the colour one is left out (the
    SR, KOS and summary image carry it), and a study with only colour regions gets no GSPS."""
    findings, composed, sources = study
    placed = [p for p in place_findings(findings, composed) if p.region is not None]
    assert len({p.region.sop_instance_uid for p in placed if p.region is not None}) == 2
    colour_uid = placed[0].region.sop_instance_uid if placed[0].region is not None else ""
    coloured = {}
    for uid, header in sources.items():
        copy = Dataset(header)
        copy.file_meta = header.file_meta
        if uid == colour_uid:
            copy.PhotometricInterpretation, copy.SamplesPerPixel, copy.PlanarConfiguration = "RGB", 3, 0
            copy.BitsAllocated, copy.BitsStored, copy.HighBit = 8, 8, 7
        coloured[uid] = copy
    state = build_presentation_state(placed, coloured, {}, UIDS, 1, "m", "p")
    assert state is not None
    path = tmp_path / "gsps.dcm"
    state.save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    referenced = {
        str(a.ReferencedImageSequence[0].ReferencedSOPInstanceUID)
        for a in dcmread(path).GraphicAnnotationSequence
    }
    assert referenced == {p.region.sop_instance_uid for p in placed[1:] if p.region is not None}
    assert build_presentation_state(placed[:1], coloured, {}, UIDS, 1, "m", "p") is None
