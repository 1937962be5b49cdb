"""The Secondary Capture summary image: what most PACS viewers can show when they cannot render
a TID 1500 SR (issue "Findings a radiologist can trust").

One 1280 x 1024 RGB image (a 1-megapixel reading monitor shows it 1:1): a red banner "AI -
UNVERIFIED - NOT FOR DIAGNOSIS"; on the left, the image the model was shown with a finding,
every region outlined and numbered; on the right, a legend with each finding's number, the
model's own words, its certainty and severity, the pertinent negatives it reported, and the
overall impression. Nothing is drawn that the model did not give; nothing identifying is
written (the picture is the de-identified one that was sent).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from analysis.derived import source_patient_names
from analysis.findings import Assertion, Finding, Findings
from analysis.mosaic import ComposedImage
from analysis.uids import UidMaker

WIDTH, HEIGHT = 1280, 1024
BANNER = 56
PANEL = HEIGHT - BANNER  # the image panel is square, PANEL x PANEL
BANNER_TEXT = "AI - UNVERIFIED - NOT FOR DIAGNOSIS"
SERIES_DESCRIPTION = "AI summary - UNVERIFIED"
SERIES_NUMBER = 9902
RED = (176, 0, 0)
OUTLINE = (255, 214, 0)  # a yellow that reads on grey anatomy
TEXT = (235, 235, 235)
DIM = (170, 170, 170)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _key_image(findings: Findings, composed: Sequence[ComposedImage]) -> int:
    """The 1-based image with the most regions (the first image when none has one)."""
    counts = [0] * len(composed)
    for finding in findings.findings:
        if (
            finding.box is not None
            and finding.image_index is not None
            and finding.image_index <= len(composed)
        ):
            counts[finding.image_index - 1] += 1
    return 1 + max(range(len(counts)), key=lambda i: (counts[i], -i)) if counts else 1


def _legend_line(number: int, finding: Finding) -> str:
    facts = []
    if finding.confidence is not None:
        facts.append(f"certainty {round(finding.confidence * 100)}%")
    if finding.severity is not None:
        facts.append(str(finding.severity))
    if finding.assertion is not Assertion.PRESENT:
        facts.append("uncertain")
    where = f" ({finding.body_site})" if finding.body_site else ""
    return f"{number}. {finding.description}{where}" + (f" - {', '.join(facts)}" if facts else "")


def view_of(present: Sequence[Finding], shown: ComposedImage, key: int) -> tuple[int, int, int, int]:
    """The part of the key image the summary shows (x0, y0, x1, y1 in its pixels): the tiles of a
    mosaic that hold its regions, enlarged, so a region on one small tile of a 6 x 5 mosaic is
    readable on a reading monitor; the whole image when no region sits on a tile."""
    rects: list[tuple[int, int, int, int]] = []
    for finding in present:
        if finding.box is None or finding.image_index != key:
            continue
        cx = (finding.box.x_min + finding.box.x_max) / 2 * shown.width
        cy = (finding.box.y_min + finding.box.y_max) / 2 * shown.height
        found = shown.to_source(cx, cy)
        if found is not None:
            tile = found[0]
            rects.append((tile.x0, tile.y0, tile.x0 + tile.width, tile.y0 + tile.height))
    if not rects or len(shown.tiles) <= 1:
        return 0, 0, shown.width, shown.height
    return (
        min(r[0] for r in rects),
        min(r[1] for r in rects),
        max(r[2] for r in rects),
        max(r[3] for r in rects),
    )


def render(
    findings: Findings, composed: Sequence[ComposedImage], simulated: bool = False
) -> NDArray[np.uint8]:
    """The summary as an RGB array, HEIGHT x WIDTH x 3."""
    if not composed:
        raise ValueError('Argument "composed" must hold at least one image, got none')
    canvas = Image.new("RGB", (WIDTH, HEIGHT), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, WIDTH, BANNER - 1), fill=RED)
    banner = ("SIMULATED - " if simulated else "") + BANNER_TEXT
    draw.text((WIDTH // 2, BANNER // 2), banner, fill=(255, 255, 255), font=_font(30), anchor="mm")

    key = _key_image(findings, composed)
    shown = composed[key - 1]
    present = [f for f in findings.findings if f.assertion is not Assertion.ABSENT]
    vx0, vy0, vx1, vy1 = view_of(present, shown, key)
    gray = Image.fromarray(shown.pixels).convert("RGB").crop((vx0, vy0, vx1, vy1))
    scale = min(PANEL / (vx1 - vx0), PANEL / (vy1 - vy0))
    size = (max(1, round((vx1 - vx0) * scale)), max(1, round((vy1 - vy0) * scale)))
    left, top = (PANEL - size[0]) // 2, BANNER + (PANEL - size[1]) // 2
    canvas.paste(gray.resize(size, Image.Resampling.LANCZOS), (left, top))
    for number, finding in enumerate(present, start=1):
        if finding.box is None or finding.image_index != key:
            continue
        box = finding.box
        x0 = left + (box.x_min * shown.width - vx0) * scale
        y0 = top + (box.y_min * shown.height - vy0) * scale
        x1 = left + (box.x_max * shown.width - vx0) * scale
        y1 = top + (box.y_max * shown.height - vy0) * scale
        # Within the picture shown: a box may reach past the tiles that hold its centre.
        x0, x1 = max(x0, left), min(x1, left + size[0] - 1)
        y0, y1 = max(y0, top), min(y1, top + size[1] - 1)
        draw.rectangle((x0, y0, x1, y1), outline=OUTLINE, width=3)
        label_y = y0 - 30 if y0 - 30 > BANNER else y1 + 4
        draw.rectangle((x0, label_y, x0 + 26, label_y + 26), fill=OUTLINE)
        draw.text((x0 + 13, label_y + 13), str(number), fill=(0, 0, 0), font=_font(20), anchor="mm")

    x, y = PANEL + 16, BANNER + 12
    body, small = _font(17), _font(15)
    line_height = 21

    def lines(
        text: str, width: int, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, fill: tuple[int, ...]
    ) -> None:
        nonlocal y
        for line in textwrap.wrap(text, width=width) or [""]:
            if y > HEIGHT - line_height:
                return
            draw.text((x, y), line, fill=fill, font=font)
            y += line_height

    lines("AI findings (unverified)", 30, _font(20), OUTLINE)
    y += 6
    if not present:
        lines("No finding reported by the AI model.", 30, body, TEXT)
    for number, finding in enumerate(present, start=1):
        lines(_legend_line(number, finding), 30, body, TEXT)
        if finding.image_index is not None and finding.image_index != key:
            lines(f"   (on image {finding.image_index} sent, not shown here)", 34, small, DIM)
        y += 6
    negatives = [f for f in findings.findings if f.assertion is Assertion.ABSENT]
    if negatives:
        lines("Not seen:", 30, _font(18), OUTLINE)
        for finding in negatives:
            lines(f"- {finding.description}", 30, body, TEXT)
        y += 6
    lines("Impression:", 30, _font(18), OUTLINE)
    lines(findings.summary, 30, body, TEXT)
    return np.asarray(canvas, dtype=np.uint8)


def build_summary(
    findings: Findings,
    composed: Sequence[ComposedImage],
    reference: Dataset,
    uids: UidMaker,
    study_version: int,
    simulated: bool = False,
) -> hd.sc.SCImage:
    """The summary as a DICOM Secondary Capture in the source study (``reference``: a header of
    the analysed study), its own series, one instance per study version."""
    pixels = render(findings, composed, simulated)
    study = str(reference.StudyInstanceUID)
    with source_patient_names():
        image = _secondary_capture(reference, pixels, uids, study, study_version)
    # The key image keeps its source's rows and columns: its orientation, when the header says it,
    # else empty (Type 2: unknown), never a guess.
    image.PatientOrientation = _orientation(reference) or []  # unknown: an empty (Type 2) value
    image.Laterality = reference.get("Laterality")  # Type 2C: the source's, or empty
    image.BurnedInAnnotation = "NO"  # findings text only; the picture is the de-identified one sent
    image.ConversionType = "WSD"  # workstation: made by software
    return image


def _secondary_capture(
    reference: Dataset, pixels: NDArray[np.uint8], uids: UidMaker, study: str, study_version: int
) -> hd.sc.SCImage:
    return hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uids.make("summary series", study),
        series_number=SERIES_NUMBER,
        sop_instance_uid=uids.make("summary", study, str(study_version)),
        instance_number=study_version,
        manufacturer="ainode",
        series_description=SERIES_DESCRIPTION,
        # highdicom insists on one; build_summary sets the true one (or none) afterwards.
        patient_orientation=("L", "P"),
    )


def _letter(vector: Sequence[float]) -> str:
    """The main patient direction a cosine vector points to (PS3.3 C.7.6.1.1.1)."""
    axis = max(range(3), key=lambda i: abs(float(vector[i])))
    return ("L", "P", "H")[axis] if float(vector[axis]) > 0 else ("R", "A", "F")[axis]


def _orientation(reference: Dataset) -> list[str] | None:
    orientation = reference.get("PatientOrientation")
    if orientation is not None and len(orientation) == 2 and all(orientation):
        return [str(orientation[0]), str(orientation[1])]
    cosines = reference.get("ImageOrientationPatient")
    if cosines is not None and len(cosines) == 6:
        return [_letter(cosines[:3]), _letter(cosines[3:])]
    return None
