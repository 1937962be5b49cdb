"""A Grayscale Softcopy Presentation State that draws each region the model placed on the
original image, numbered and labelled, in its own graphic layer (issue "Findings a radiologist
can trust"): viewers that apply presentation states show the regions on the real images, where
the radiologist reads, not only on the summary picture.

Nothing is drawn that the model did not give: the outline is the model's box mapped to the
source image, the label its words; the window is the source image's own (highdicom copies the
header's), or, when the header has none, the one the model was shown."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from analysis.derived import (
    MANUFACTURER,
    ai_equipment,
    carry_deidentification,
    mark_processing_algorithm,
    source_patient_names,
)
from analysis.findings import Assertion
from analysis.regions import PlacedFinding
from analysis.uids import UidMaker
from analysis.windows import header_window

SERIES_DESCRIPTION = "AI regions - UNVERIFIED"
SERIES_NUMBER = 9904
CONTENT_LABEL = "AI_FINDINGS"  # CS, at most 16 characters
LAYER = "AI FINDINGS"
MAX_LABEL = 96  # a label beside a region must stay readable on the image


def _label(item: PlacedFinding, simulated: bool) -> str:
    # highdicom refuses a backslash in the label (an ST); the model may write one ("right\\upper").
    words = " ".join(item.finding.description.replace("\\", "/").split())
    hedge = "" if item.finding.assertion is Assertion.PRESENT else ", uncertain"
    label = f"{item.number}. {'SIMULATED ' if simulated else ''}AI{hedge} (unverified): {words}"
    return label if len(label) <= MAX_LABEL else label[: MAX_LABEL - 1] + "…"


def _window(ds: Dataset, windows: dict[str, tuple[float, float]]) -> tuple[float, float] | None:
    """The image's own first window; else the one the model was shown; else None."""
    center, width = header_window(ds)
    if center is not None and width is not None and width >= 1:
        return center, width
    return windows.get(str(ds.SOPInstanceUID))


def build_presentation_state(
    placed: Sequence[PlacedFinding],
    sources: dict[str, Dataset],
    windows: dict[str, tuple[float, float]],
    uids: UidMaker,
    study_version: int,
    model: str,
    prompt_version: str,
    simulated: bool = False,
) -> hd.pr.GrayscaleSoftcopyPresentationState | None:
    """The GSPS for one study version, or None when no finding has a region. ``sources``: the
    headers (no pixels) of the images shown, by SOP Instance UID; ``windows``: (center, width)
    the model was shown each image in, used only for images whose header has no window."""
    # A grayscale presentation state may reference only grayscale images (one sample per pixel):
    # a region on a colour image (an ultrasound, a secondary capture) is left to the SR, the KOS
    # and the summary image, instead of taking every other region's state down with it.
    regions = [
        item
        for item in placed
        if item.region is not None
        and int(sources[item.region.sop_instance_uid].get("SamplesPerPixel", 1) or 1) == 1
    ]
    if not regions:
        return None
    layer = hd.pr.GraphicLayer(layer_name=LAYER, order=1, description="AI regions, unverified")
    by_frame: dict[tuple[str, int], list[PlacedFinding]] = defaultdict(list)
    for item in regions:
        assert item.region is not None
        by_frame[(item.region.sop_instance_uid, item.region.frame_index)].append(item)
    annotations = []
    for (uid, frame_index), items in sorted(by_frame.items()):
        source = sources[uid]
        multi_frame = int(source.get("NumberOfFrames", 1) or 1) > 1
        graphics, texts = [], []
        for item in items:
            assert item.region is not None
            corners = np.array(item.region.corners(), dtype=np.float64)
            graphics.append(hd.pr.GraphicObject(graphic_type="POLYLINE", graphic_data=corners, units="PIXEL"))
            texts.append(
                hd.pr.TextObject(
                    text_value=_label(item, simulated),
                    units="PIXEL",
                    anchor_point=(float(item.region.column_min), float(item.region.row_min)),
                    anchor_point_visible=False,
                    text_justification="LEFT",
                )
            )
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[source],
                graphic_layer=layer,
                referenced_frame_number=frame_index + 1 if multi_frame else None,
                graphic_objects=graphics,
                text_objects=texts,
            )
        )
    referenced = [sources[uid] for uid in sorted({uid for uid, _ in by_frame})]
    study = str(referenced[0].StudyInstanceUID)
    voi = [
        hd.pr.SoftcopyVOILUTTransformation(
            window_center=center,
            window_width=width,
            referenced_images=hd.ReferencedImageSequence(referenced_images=[ds]),
        )
        for ds in referenced
        if (window := _window(ds, windows)) is not None
        for center, width in [window]
    ]
    with source_patient_names():
        state = hd.pr.GrayscaleSoftcopyPresentationState(
            referenced_images=referenced,
            series_instance_uid=uids.make("presentation state series", study),
            series_number=SERIES_NUMBER,
            sop_instance_uid=uids.make(
                "presentation state", study, str(study_version), *(f"{u}/{f}" for u, f in sorted(by_frame))
            ),
            instance_number=study_version,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=model[:64],
            software_versions=f"ainode {prompt_version}",
            device_serial_number=str(uids.installation)[:16],
            content_label=CONTENT_LABEL,
            content_description=("SIMULATED " if simulated else "") + "AI regions - UNVERIFIED",
            graphic_annotations=annotations,
            graphic_layers=[layer],
            voi_lut_transformations=voi or None,
            contributing_equipment=[ai_equipment(model, prompt_version, simulated, "AI regions")],
        )
    mark_processing_algorithm(state)
    carry_deidentification(state, referenced)
    state.SeriesDescription = SERIES_DESCRIPTION
    state.SpecificCharacterSet = "ISO_IR 192"  # the model's words, in any script (as the SR)
    state.Laterality = referenced[0].get("Laterality")  # Type 2C: the source's, or empty
    return state
