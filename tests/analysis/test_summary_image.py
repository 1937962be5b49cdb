"""The Secondary Capture summary: valid in dciodvfy, the regions outlined where the model put
them, the legend and banner legible, and written out as a PNG to look at."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread

from analysis.summary_image import (
    BANNER,
    OUTLINE,
    PANEL,
    RED,
    SERIES_DESCRIPTION,
    build_summary,
    render,
    view_of,
)
from analysis.uids import UidMaker
from analysis.vision.reading import read_findings
from tests.analysis.test_report import prepared


def _reply(sizes: list[tuple[int, int]]) -> dict[str, object]:
    box = {"x_min": 0.30, "y_min": 0.30, "x_max": 0.45, "y_max": 0.42}
    return {
        "summary": "Spiculated right upper lobe mass; no pneumothorax. Recommend CT-guided biopsy review.",
        "findings": [
            {
                "description": "2 cm spiculated mass",
                "assertion": "present",
                "finding_code": "4147007",
                "body_site": "right upper lobe",
                "image_index": 1,
                "box": box,
                "confidence": 0.82,
                "severity": "severe",
            },
            {
                "description": "Possible small left effusion",
                "assertion": "uncertain",
                "image_index": 1,
                "box": {"x_min": 0.6, "y_min": 0.7, "x_max": 0.8, "y_max": 0.85},
                "confidence": 0.4,
            },
            {"description": "No pneumothorax", "assertion": "absent"},
        ],
    }


def test_the_summary_image_outlines_each_region_and_is_a_valid_secondary_capture(tmp_path: Path) -> None:
    study_prep, sources, study = prepared(tmp_path, "693_UNCI.dcm", 20)
    sizes = [(image.width, image.height) for image in study_prep.encoded]
    findings = read_findings(_reply(sizes), sizes, "fraction")
    pixels = render(findings, study_prep.composed)
    Image.fromarray(pixels).save(tmp_path / "summary.png")  # to look at
    assert pixels.shape == (1024, 1280, 3)
    assert tuple(pixels[BANNER // 4, 8]) == RED  # the banner
    banner_text = pixels[:BANNER, :, :]
    assert (banner_text == 255).all(axis=2).sum() > 500  # white letters on it
    # The first region's outline runs along its left edge, where the model put it, on the part
    # of the image shown: the mosaic's tile that holds the regions, enlarged.
    shown = study_prep.composed[0]
    present = [f for f in findings.findings if f.assertion != "absent"]
    vx0, vy0, vx1, vy1 = view_of(present, shown, 1)
    if len(shown.tiles) > 1:
        assert (vx1 - vx0, vy1 - vy0) != (shown.width, shown.height)  # a mosaic is shown zoomed in
    scale = min(PANEL / (vx1 - vx0), PANEL / (vy1 - vy0))
    left = (PANEL - round((vx1 - vx0) * scale)) // 2
    top = BANNER + (PANEL - round((vy1 - vy0) * scale)) // 2
    x = round(left + (0.30 * shown.width - vx0) * scale)
    rows = slice(
        top + round((0.32 * shown.height - vy0) * scale), top + round((0.40 * shown.height - vy0) * scale)
    )
    column = pixels[rows, x]
    assert len(column) > 5 and (column == OUTLINE).all(axis=1).mean() > 0.9
    legend = pixels[BANNER:, PANEL:, :]
    assert (legend.max(axis=2) > 128).sum() > 5000  # the legend holds text

    reference = next(iter(sources.values()))
    image = build_summary(findings, study_prep.composed, reference, UidMaker(uuid.uuid4()), 1)
    path = tmp_path / "summary.dcm"
    image.save_as(path, enforce_file_format=True)
    check = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=60
    )
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert errors == []
    written = dcmread(path)
    assert written.StudyInstanceUID == study and "PatientOrientation" in written
    assert written.SeriesDescription == SERIES_DESCRIPTION and written.BurnedInAnnotation == "NO"
    assert np.array_equal(written.pixel_array, pixels)
