"""What every object the node derives from a study (SR, summary image, key object selection,
presentation state) must say about where its patient module came from."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

MANUFACTURER = "ainode"
# IHE AI Results (AIR): Contributing Equipment names the algorithm with this purpose.
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
AS_RECEIVED = "As received: source images marked de-identified"


def carry_deidentification(derived: Dataset, sources: Sequence[Dataset]) -> None:
    """Patient Identity Removed copied as YES makes De-identification Method Type 1C (PS3.3
    C.7.1.1): copy the sources' method, or say that the images came so."""
    if derived.get("PatientIdentityRemoved") != "YES":
        return
    if "DeidentificationMethod" in derived or "DeidentificationMethodCodeSequence" in derived:
        return
    method = next((str(ds.DeidentificationMethod) for ds in sources if "DeidentificationMethod" in ds), None)
    derived.DeidentificationMethod = method or AS_RECEIVED


def ai_equipment(model: str, prompt_version: str, simulated: bool, made: str) -> hd.ContributingEquipment:
    """The AI as contributing equipment (``made``: what it contributed, e.g. "AI findings").
    Its purpose is set to IHE AIR's Processing Algorithm by :func:`mark_processing_algorithm`
    once the object is built: CID 7005 is extensible, but highdicom takes only its listed codes."""
    return hd.ContributingEquipment(
        manufacturer=MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model[:64],
        software_versions=f"ainode {prompt_version}",
        contribution_description=("SIMULATED " if simulated else "") + f"{made}, unverified",
    )


def mark_processing_algorithm(derived: Dataset) -> None:
    """The last Contributing Equipment item (the one :func:`ai_equipment` made) gets IHE AIR's
    purpose, Processing Algorithm."""
    purpose = Dataset()
    purpose.CodeValue = PROCESSING_ALGORITHM.value
    purpose.CodingSchemeDesignator = PROCESSING_ALGORITHM.scheme_designator
    purpose.CodeMeaning = PROCESSING_ALGORITHM.meaning
    item: Dataset = derived.ContributingEquipmentSequence[-1]
    item.PurposeOfReferenceCodeSequence = DicomSequence([purpose])


@contextlib.contextmanager
def source_patient_names() -> Iterator[None]:
    """Build a derived object with the patient's name copied as the source has it: highdicom's
    style warning about single-component names is about the hospital's data, not about ours."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The string .* is unlikely to represent the intended person"
        )
        yield
