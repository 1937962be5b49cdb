"""A Key Object Selection document flagging the images on which the model placed a finding
(issue "Findings a radiologist can trust"): viewers that know KOS (most PACS) mark those images
as key images, so a radiologist can jump to them without reading the SR."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from analysis.derived import (
    MANUFACTURER,
    ai_equipment,
    carry_deidentification,
    mark_processing_algorithm,
    source_patient_names,
)
from analysis.regions import PlacedFinding
from analysis.uids import UidMaker

SERIES_DESCRIPTION = "AI key images - UNVERIFIED"
SERIES_NUMBER = 9903
MAX_DESCRIPTION = 1024  # Key Object Description is a TEXT item: keep it short enough to read


def _description(placed: Sequence[PlacedFinding], simulated: bool) -> str:
    lines = [("SIMULATED " if simulated else "") + "AI findings - UNVERIFIED, not for diagnosis."]
    for item in placed:
        if item.region is not None:
            words = " ".join(item.finding.description.split())
            lines.append(f"{item.number}. {words}")
    text = "\n".join(lines)
    return text if len(text) <= MAX_DESCRIPTION else text[: MAX_DESCRIPTION - 1] + "…"


def build_key_images(
    placed: Sequence[PlacedFinding],
    sources: dict[str, Dataset],
    uids: UidMaker,
    study_version: int,
    model: str,
    prompt_version: str,
    simulated: bool = False,
) -> hd.ko.KeyObjectSelectionDocument | None:
    """The KOS for one study version, or None when no finding has a region (nothing to flag).
    ``sources``: the headers (no pixels) of the images shown, by SOP Instance UID."""
    flagged = sorted({item.region.sop_instance_uid for item in placed if item.region is not None})
    if not flagged:
        return None
    referenced = [sources[uid] for uid in flagged]
    study = str(referenced[0].StudyInstanceUID)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest,
        referenced_objects=referenced,
        description=_description(placed, simulated),
    )
    with source_patient_names():
        document = hd.ko.KeyObjectSelectionDocument(
            evidence=referenced,
            content=content,
            series_instance_uid=uids.make("key images series", study),
            series_number=SERIES_NUMBER,
            sop_instance_uid=uids.make("key images", study, str(study_version), *flagged),
            instance_number=study_version,
            manufacturer=MANUFACTURER,
            contributing_equipment=[ai_equipment(model, prompt_version, simulated, "AI key images")],
        )
    for item in document.ContentSequence:
        # TID 2010 row 8 names no concept for the flagged images (PixelMed refuses one);
        # highdicom adds (260753009, SCT, "Source") for toolkits that want a name.
        if item.ValueType in ("IMAGE", "COMPOSITE") and "ConceptNameCodeSequence" in item:
            del item.ConceptNameCodeSequence
    mark_processing_algorithm(document)
    carry_deidentification(document, referenced)
    document.SeriesDescription = SERIES_DESCRIPTION
    document.SpecificCharacterSet = "ISO_IR 192"  # the model's words, in any script (as the SR)
    return document
