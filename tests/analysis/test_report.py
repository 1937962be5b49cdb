"""SRs built from CT, MR, CR and US studies pass dciodvfy, dsrdump and PixelMed's validator."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from analysis.finding_codes import BodyRegion, code_list
from analysis.findings import Findings
from analysis.mosaic import ComposedImage
from analysis.prepare import PreparedStudy
from analysis.report import OHIF_RECTANGLE_TRACKING, SR_SERIES_DESCRIPTION, ReportContext, build_sr
from analysis.uids import UidMaker
from analysis.vision.reading import read_findings
from analysis.vision.simulator import simulated_findings
from conf import ImagingSettings
from tests.data.generate import write_series
from tests.data.ingest import prepared_study
from tests.data.ohif import ohif_measurements, tracking_offered
from tests.data.validators import saved_and_valid

INSTALLATION = UidMaker(uuid.UUID("6f1c1e0a-3a51-4c59-9d39-1f6a5d0c2b7e"))  # one test installation
STARTED = dt.datetime(2026, 11, 25, 9, 30, 15, tzinfo=dt.UTC)


def prepared(tmp_path: Path, source: str, count: int) -> tuple[PreparedStudy, dict[str, Dataset], str]:
    study = generate_uid()
    files = write_series(tmp_path / "src", count, source=source, study_instance_uid=study)
    # An ultrasound without BurnedInAnnotation is held back unless the site masks it (issue 13).
    result, _ = prepared_study(files, tmp_path, ImagingSettings(unlabelled_burned_in={"US": "mask"}))
    headers = {str(h.SOPInstanceUID): h for h in (dcmread(f, stop_before_pixels=True) for f in files)}
    # Every slice a slab tile shows: a region may land on any of them (the worker's sources).
    return result, {uid: headers[uid] for uid in result.shown_instances}, study


def findings(with_box: bool, text: str = "nodule, spiculated", site: str = "right upper lobe") -> Findings:
    data = simulated_findings(images=1, codes=code_list([BodyRegion.CHEST]))  # coded Nodule
    data["summary"] = "SIMULATED: 結節 im rechten Oberlappen, ümlaut and façade"
    finding = data["findings"][0]
    finding["description"] = text
    finding["body_site"] = site
    if not with_box:
        finding["box"] = None
    return Findings.model_validate(data)


def context(study: str, **changes: object) -> ReportContext:
    values: dict[str, object] = {
        "study_instance_uid": study,
        "study_version": 1,
        "provider": "simulator",
        "model": "ainode-simulated-vision",
        "prompt_version": "ainode-prompt-1",
        "analysis_started": STARTED,
        "uids": INSTALLATION,
        "simulated": True,
        **changes,
    }
    return ReportContext(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("source", "count", "with_box"),
    [
        ("693_UNCI.dcm", 20, True),  # CT mosaic, region on a slice
        ("emri_small.dcm", 1, True),  # MR multi-frame, region on a frame
        ("RG1_UNCI.dcm", 1, True),  # CR MONOCHROME1
        ("US1_UNCI.dcm", 1, False),  # US, finding without a region
    ],
    ids=["CT", "MR", "CR", "US"],
)
def test_sr_passes_all_three_validators(tmp_path: Path, source: str, count: int, with_box: bool) -> None:
    study_prep, sources, study = prepared(tmp_path, source, count)
    sr = build_sr(
        findings(with_box, "Nodule with ümlaut", "lóbulo superior derecho 右上葉"),
        study_prep.composed,
        sources,
        context(study),
    )
    path = tmp_path / "sr.dcm"
    written = saved_and_valid(sr, path)
    assert written.StudyInstanceUID == study and written.Modality == "SR"
    assert written.SeriesDescription == SR_SERIES_DESCRIPTION
    assert (written.PreliminaryFlag, written.VerificationFlag) == ("PRELIMINARY", "UNVERIFIED")
    assert written.SpecificCharacterSet == "ISO_IR 192"
    assert (written.ContentDate, written.ContentTime) == ("20261125", "093015")
    assert written.ContentSequence and written.ConceptNameCodeSequence[0].CodeValue == "126000"
    text = path.read_bytes()
    assert "結節".encode() in text and "右上葉".encode() in text and b"SIMULATED" in text
    scoords = [item for item in _walk(written) if item.ValueType == "SCOORD"]
    assert len(scoords) == (1 if with_box else 0)


def _walk(ds: Dataset) -> list[Dataset]:
    items = []
    for item in ds.get("ContentSequence", []):
        items.append(item)
        items += _walk(item)
    return items


def test_a_region_carries_the_models_certainty_never_a_length_that_looks_measured(tmp_path: Path) -> None:
    """The first NUM of a group with a region is the certainty, INFERRED FROM the SCOORD (what
    OHIF's adapter rebuilds a tool from); no NUM reads as a lesion size the model never measured."""
    study_prep, sources, study = prepared(tmp_path, "693_UNCI.dcm", 20)
    sr = build_sr(findings(True), study_prep.composed, sources, context(study))
    group = next(
        i
        for i in _walk(sr)
        if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "125007"
    )
    children = list(group.ContentSequence)
    identifiers = [c for c in children if c.ConceptNameCodeSequence[0].CodeValue == "112039"]
    assert [i.TextValue for i in identifiers] == [
        f"{OHIF_RECTANGLE_TRACKING} SIMULATED AI: nodule, right upper lobe"
    ]
    nums = [c for c in children if c.ValueType == "NUM"]
    assert [n.ConceptNameCodeSequence[0].CodeMeaning for n in nums] == ["Certainty of Finding"]
    first_num = nums[0]
    assert first_num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "%"
    assert not any(i.ConceptNameCodeSequence[0].CodeMeaning == "Length" for i in _walk(sr))
    (scoord,) = first_num.ContentSequence
    assert (scoord.RelationshipType, scoord.ValueType, scoord.GraphicType) == (
        "INFERRED FROM",
        "SCOORD",
        "POLYLINE",
    )
    points = list(scoord.GraphicData)
    assert len(points) == 10 and points[:2] == points[-2:]  # closed, 5 points
    (image,) = scoord.ContentSequence
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID in sources


def test_same_input_same_uids_and_a_new_version_names_its_predecessor(tmp_path: Path) -> None:
    study_prep, sources, study = prepared(tmp_path, "RG1_UNCI.dcm", 1)
    first = build_sr(findings(True), study_prep.composed, sources, context(study))
    again = build_sr(findings(True), study_prep.composed, sources, context(study))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    newer = build_sr(
        findings(True),
        study_prep.composed,
        sources,
        context(study, study_version=2, model="other-model", predecessor=first),
    )
    assert newer.SeriesInstanceUID == first.SeriesInstanceUID and newer.SOPInstanceUID != first.SOPInstanceUID
    assert (
        newer.PredecessorDocumentsSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == first.SOPInstanceUID
    )
    saved_and_valid(newer, tmp_path / "v2.dcm")


def test_a_study_without_findings_gets_an_sr_that_says_so(tmp_path: Path) -> None:
    study_prep, sources, study = prepared(tmp_path, "RG1_UNCI.dcm", 1)
    empty = Findings.model_validate({**simulated_findings(images=0), "summary": "No acute abnormality."})
    sr = build_sr(empty, study_prep.composed, sources, context(study, simulated=False))
    texts = [i.TextValue for i in _walk(sr) if i.ValueType == "TEXT"]
    assert "No findings reported by the AI model." in texts and "No acute abnormality." in texts
    assert any(t.startswith("Unverified findings generated by an AI model") for t in texts)
    saved_and_valid(sr, tmp_path / "empty.dcm")


def test_degraded_findings_and_sources_missing_type_2_attributes_still_make_a_valid_sr(
    tmp_path: Path,
) -> None:
    """A finding that lost its region, certainty, severity and site (reading kept only its words
    and a note), from sources without StudyID or AccessionNumber (Type 2: highdicom needs them
    present): the SR is valid and says in words what was dropped."""
    study_prep, sources, study = prepared(tmp_path, "693_UNCI.dcm", 4)
    for header in sources.values():
        for keyword in ("StudyID", "AccessionNumber", "ReferringPhysicianName"):
            if keyword in header:
                delattr(header, keyword)
    data = simulated_findings(images=1)
    data["findings"][0] = {"description": "Opacity, left base", "image_index": 7, "box": None}
    degraded = read_findings(data, [(512, 512)], "fraction")
    sr = build_sr(degraded, study_prep.composed, sources, context(study))
    written = saved_and_valid(sr, tmp_path / "sr.dcm")
    texts = [str(item.TextValue) for item in _walk(written) if item.ValueType == "TEXT"]
    assert any("placed this finding on image 7, but 1 image(s) were sent" in text for text in texts)


def test_an_sr_from_degraded_findings_in_any_script_passes_all_three_validators(tmp_path: Path) -> None:
    """What reading keeps of a bad reply (no region, no certainty, notes) and the model's words as
    they come (long Japanese, a backslash, control characters) make a valid SR: a Code Meaning is
    one LO value of at most 64 bytes."""
    study_prep, sources, study = prepared(tmp_path, "RG1_UNCI.dcm", 1)
    sizes = [(image.width, image.height) for image in study_prep.encoded]
    box = {"x_min": 0.1, "y_min": 0.1, "x_max": 0.2, "y_max": 0.2}
    japanese = "右上葉に結節影を認める。大きさは約十五ミリで辺縁は不整である"
    reply = {
        "summary": "SIMULATED: a\\b \x1b[31m red \x07",
        "findings": [
            # coded terms (the model's words as Code Meanings) come with a region: findings
            # placed on no image are said in words only
            {
                "description": japanese,
                "body_site": "右肺上葉の後区域、胸膜直下",
                "image_index": 1,
                "box": box,
            },
            {
                "description": "opacity \\ effusion\x0c",
                "body_site": "lobe\\left\x01",
                "recommendation": "x\\y\x02",
                "image_index": 1,
                "box": box,
                "confidence": 7,
            },
            {"description": "inverted", "image_index": 1, "box": {**box, "x_min": 0.5}},
            "not a finding",
        ],
    }
    findings = read_findings(reply, sizes, "fraction")
    assert [bool(f.notes) for f in findings.findings] == [False, True, True] and findings.notes
    sr = build_sr(findings, study_prep.composed, sources, context(study, simulated=False))
    written = saved_and_valid(sr, tmp_path / "sr.dcm")
    meanings = [
        item.ConceptCodeSequence[0].CodeMeaning for item in _walk(written) if "ConceptCodeSequence" in item
    ]
    assert "右上葉に結節影を認める。大きさは約十五ミリ" in meanings and "lobe/left" in meanings


def _codes(ds: Dataset) -> set[tuple[str, str]]:
    found = set()
    for item in _walk(ds):
        for attribute in ("ConceptCodeSequence", "ConceptNameCodeSequence"):
            for code in item.get(attribute, []):
                found.add((str(code.CodingSchemeDesignator), str(code.CodeValue)))
    return found


def test_negated_and_uncertain_findings_are_never_coded_as_present(tmp_path: Path) -> None:
    study_prep, sources, study = prepared(tmp_path, "RG1_UNCI.dcm", 1)
    base = simulated_findings(images=1)["findings"][0]
    summary = "Impression: " + "no acute cardiopulmonary abnormality; " * 160  # about 6000 characters
    reply = {
        "summary": summary,
        "findings": [
            {
                **base,
                "description": "No pneumothorax or pleural effusion is seen.",
                "assertion": "absent",
                "finding_code": "36118008",
            },
            {
                **base,
                "description": "Possible small pleural effusion, left\\base\nblunted angle",
                "assertion": "uncertain",
                "finding_code": "60046008",
                "body_site": "left costophrenic angle",
            },
            {
                **base,
                "description": "2 cm spiculated mass, suspicious for malignancy",
                "assertion": "present",
                "finding_code": None,
                "body_site": "right upper lobe",
            },
        ],
    }
    assert study_prep.codes.regions == (BodyRegion.CHEST,)  # a CR of the CHEST: both codes offered
    findings = read_findings(reply, [(512, 512)], "fraction", study_prep.codes)
    sr = build_sr(findings, study_prep.composed, sources, context(study, simulated=False))
    written = saved_and_valid(sr, tmp_path / "sr.dcm")
    coded = _codes(written)
    assert ("SCT", "36118008") not in coded and ("SCT", "60046008") not in coded  # neither is present
    labels = [str(i.TextValue) for i in _walk(written) if i.ConceptNameCodeSequence[0].CodeValue == "112039"]
    assert labels == [  # a tool OHIF can load, the model's words, hedged; cut at 64 characters
        f"{OHIF_RECTANGLE_TRACKING} AI: Possible small pleural effusion, left\\base blunt (uncertain)",
        f"{OHIF_RECTANGLE_TRACKING} AI: 2 cm spiculated mass, suspicious for malignancy, right upper",
    ]
    texts = [str(i.TextValue) for i in _walk(written) if i.ValueType == "TEXT"]
    assert "Not seen (AI): No pneumothorax or pleural effusion is seen." in texts  # a negative, in words
    assert "AI: 2 cm spiculated mass, suspicious for malignancy, right upper lobe (unverified)" in texts
    assert any(text.startswith("Impression:") and len(text) == len(summary.strip()) for text in texts)
    groups = [
        i
        for i in _walk(written)
        if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "125007"
    ]
    assert len(groups) == 2  # the absent finding has no measurement group


def test_the_sr_codes_only_concepts_on_the_list_of_the_studys_body_region(tmp_path: Path) -> None:
    """A chest study: a present finding coded with a head concept keeps its words, uncoded, and
    says why; one coded from the chest list (written with spaces around it) is coded."""
    study_prep, sources, study = prepared(tmp_path, "RG1_UNCI.dcm", 1)
    base = simulated_findings(images=1, codes=study_prep.codes)["findings"][0]
    reply = {
        "summary": "Left apical pneumothorax.",
        "findings": [
            {**base, "description": "Hyperdense focus over the left apex", "finding_code": "1386000"},
            {**base, "description": "Left apical pneumothorax", "finding_code": " 36118008 "},
        ],
    }
    findings = read_findings(reply, [(512, 512)], "fraction", study_prep.codes)
    sr = build_sr(findings, study_prep.composed, sources, context(study, simulated=False))
    written = saved_and_valid(sr, tmp_path / "sr.dcm")
    types = [
        (str(i.ConceptCodeSequence[0].CodingSchemeDesignator), str(i.ConceptCodeSequence[0].CodeMeaning))
        for i in _walk(written)
        if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "121071"  # Finding
    ]
    assert types == [("99AINODE", "Hyperdense focus over the left apex"), ("SCT", "Pneumothorax")]
    assert ("SCT", "1386000") not in _codes(written)
    sct = {value for scheme, value in _codes(written) if scheme == "SCT"}
    assert "36118008" in sct
    texts = [str(i.TextValue) for i in _walk(written) if i.ValueType == "TEXT"]
    assert any(
        "1386000 (Intracranial hemorrhage), which is not on the list for the chest" in text for text in texts
    )


def _box_on(image: ComposedImage, tile: int, left: float, top: float) -> dict[str, float]:
    """A box (fractions of ``image``) inside its tile ``tile``, so it lands on that slice."""
    t = image.tiles[tile]
    x0, y0 = t.x0 + left * t.width, t.y0 + top * t.height
    x1, y1 = x0 + 0.15 * t.width, y0 + 0.15 * t.height
    return {
        "x_min": x0 / image.width,
        "y_min": y0 / image.height,
        "x_max": x1 / image.width,
        "y_max": y1 / image.height,
    }


# A number with a unit of length, area or volume: what reads as a lesion measured on the image.
MEASURED = re.compile(r"\d\s*(mm|cm|mm2|cm2|mm3|cm3|ml|mL|\[?mm\^?2)\b|Length|Area|Diameter|Long Axis|Volume")


def test_ohif_prints_the_findings_words_beside_each_region_and_can_track_them(tmp_path: Path) -> None:
    """Read as OHIF 3.13.2 reads it (tests/data/ohif.py; benchmarks/ohif_view.py shows the real
    viewer): beside each region, the model's words, said to be the AI's and unverified, and no
    number that reads as measured; every group can be loaded into the measurement panel as the
    rectangle it is, keeping that label, so the regions never vanish when tracking is accepted;
    and no group lacks a region (OHIF then shows nothing of the SR at all)."""
    study_prep, sources, study = prepared(tmp_path, "693_UNCI.dcm", 20)
    image = study_prep.composed[0]
    base = {"image_index": 1, "confidence": 0.8}
    reply = {
        "summary": "Nodule and a possible effusion.",
        "findings": [
            {
                **base,
                "description": "Solid nodule, smooth margins",
                "assertion": "present",
                "finding_code": "27925004",
                "body_site": "right upper lobe",
                "box": _box_on(image, 1, 0.2, 0.3),
            },
            {
                **base,
                "description": "Possible left pleural effusion",
                "assertion": "uncertain",
                "finding_code": "60046008",
                "box": _box_on(image, 3, 0.6, 0.6),
            },
            {
                **base,
                "description": "Spiculated mass suspicious for malignancy",
                "assertion": "present",
                "body_site": "left lower lobe",
                "box": _box_on(image, 5, 0.3, 0.2),
            },
            {
                "description": "Mild cardiomegaly",
                "assertion": "present",
                "finding_code": "8186001",
                "confidence": 0.6,
            },
            {"description": "No pneumothorax", "assertion": "absent", "finding_code": "36118008"},
        ],
    }
    findings = read_findings(reply, [(i.width, i.height) for i in study_prep.encoded], "fraction")
    sr = build_sr(findings, study_prep.composed, sources, context(study, simulated=False))
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    measurements = ohif_measurements(dcmread(path))

    assert not [m.tracking_identifier for m in measurements if m.breaks_the_viewer]
    expected = {
        "Solid nodule, smooth margins": "AI: Solid nodule, smooth margins, right upper lobe (unverified)",
        "Possible left pleural effusion": "AI: Possible left pleural effusion (uncertain, unverified)",
        "Spiculated mass suspicious for malignancy": (
            "AI: Spiculated mass suspicious for malignancy, left lower lobe (unverified)"
        ),
    }
    assert len(measurements) == len(expected)  # one per region; words only for the rest
    for measurement, (words, label) in zip(measurements, expected.items(), strict=True):
        assert f"{label}: " in measurement.labels, measurement.labels
        printed = " / ".join(measurement.labels).replace(words, "")  # the model may say "8 mm"
        assert not MEASURED.search(printed), measurement.labels
        assert [line for line in measurement.labels if line != f"{label}: "] == [
            "Certainty of Finding: 80.00 %"
        ]
        assert measurement.adapter() == "RectangleROI"
        assert measurement.rebuilt_label() == label  # kept when tracking is accepted: nothing vanishes
    assert tracking_offered(measurements)  # no "not compatible with this application" badge
    texts = [str(i.TextValue) for i in _walk(sr) if i.ValueType == "TEXT"]
    assert "AI: Mild cardiomegaly (unverified); certainty 60 %; no region on an image" in texts
