"""The closed lists of SNOMED CT codes a model may code its findings from, one per body region,
and the body region of a series.

Issue 11: "the findings schema carries, per finding, ... an optional SNOMED CT code chosen from a
closed list we provide for the body region, and the node validates the code against that list".
A head CT is offered hemorrhage and infarct, never pneumothorax; a chest radiograph the reverse.
The schema (:func:`analysis.findings.findings_schema`) offers only the study's list, and reading
a reply (:mod:`analysis.vision.reading`) keeps a code only when it is on that list: any other code
(another region's, or none of ours) leaves the finding uncoded, in the model's words, with a note.

Every concept is SNOMED CT (scheme ``SCT``), its meaning as DICOM PS3.16 or pydicom's
``pydicom.sr.codedict`` spell it where they list it (``tests/analysis/test_finding_codes.py``
checks those against pydicom), else SNOMED CT's preferred term. Each list opens with a mild
concept peculiar to its region: it is what ``ainode simulate-vision`` answers with (an enum's
first value), so a simulated SR shows which list the request carried without alarming anyone.

The body region comes from what the images' headers say (read locally, never sent): Body Part
Examined, then the series, protocol and study descriptions, then the modality (mammography is
the breast) and, for CT, the anatomy :func:`analysis.windows.ct_anatomy` judges from the header
window and the HU histogram, as the CT windows are chosen. A study whose images name no region
gets the general list.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from analysis.windows import ct_anatomy


class BodyRegion(enum.StrEnum):
    CHEST = "chest"
    HEAD = "head"
    ABDOMEN_PELVIS = "abdomen_pelvis"
    MUSCULOSKELETAL = "musculoskeletal"
    BREAST = "breast"
    GENERAL = "general"  # no region known: region-agnostic concepts only

    @property
    def words(self) -> str:
        return REGION_WORDS[self]


# As the schema and the notes say a list: "the closed list for the chest".
REGION_WORDS: dict[BodyRegion, str] = {
    BodyRegion.CHEST: "the chest",
    BodyRegion.HEAD: "the head and brain",
    BodyRegion.ABDOMEN_PELVIS: "the abdomen and pelvis",
    BodyRegion.MUSCULOSKELETAL: "bones, joints and spine",
    BodyRegion.BREAST: "the breast",
    BodyRegion.GENERAL: "a study of unknown body region",
}

# Every concept any list offers: code -> meaning, one meaning per code whatever the region. A
# finding stored by an earlier version keeps its code only if it is here (analysis.findings).
CONCEPTS: dict[str, str] = {
    # found in pydicom.sr.codedict with this meaning
    "27925004": "Nodule",
    "4147007": "Mass",
    "52988006": "Lesion",
    "367643001": "Cyst",
    "44132006": "Abscess",
    "50960005": "Hemorrhage",
    "35566002": "Hematoma",
    "79654002": "Edema",
    "19227008": "Foreign body",
    "18115005": "Pathologic calcification",
    "60046008": "Pleural effusion",
    "36118008": "Pneumothorax",
    "19242006": "Pulmonary edema",
    "59282003": "Pulmonary embolism",
    "16838000": "Pneumomediastinum",
    "373945007": "Pericardial effusion",
    "30746006": "Lymphadenopathy",
    "1386000": "Intracranial hemorrhage",
    "301766008": "Lesion of brain",
    "85659009": "Aneurysm",
    "67362008": "Aortic aneurysm",
    "80515008": "Hepatomegaly",
    "129792006": "Architectural distortion of breast",
    "129769006": "Calcification cluster",
    "129770007": "Individual calcification",
    "129790003": "Asymmetric breast tissue",
    "129789007": "Focal asymmetric breast tissue",
    "129797000": "Skin thickening of breast",
    "129796009": "Skin retraction of breast",
    "127189005": "Axillary lymphadenopathy",
    "443808008": "Intramammary lymph node",
    "399294002": "Cyst of breast",
    # SNOMED CT concepts pydicom does not list (preferred terms)
    "95436008": "Lung consolidation",
    "46621007": "Atelectasis",
    "87433001": "Pulmonary emphysema",
    "8186001": "Cardiomegaly",
    "12295008": "Bronchiectasis",
    "125605004": "Fracture of bone",
    "55641003": "Infarct",
    "432504007": "Cerebral infarction",
    "274100004": "Cerebral hemorrhage",
    "21454007": "Subarachnoid hemorrhage",
    "230745008": "Hydrocephalus",
    "389026000": "Ascites",
    "95570007": "Kidney stone",
    "235919008": "Gallbladder calculus",
    "43064006": "Hydronephrosis",
    "81060008": "Intestinal obstruction",
    "74400008": "Appendicitis",
    "16294009": "Splenomegaly",
    "87642003": "Dislocation",
    "396275006": "Osteoarthritis",
    "298382003": "Scoliosis deformity of spine",
    "274152003": "Spondylolisthesis",
    "76107001": "Spinal stenosis",
}

# The closed list of each region, in the order the schema offers them (the first: see above).
CODES_BY_REGION: dict[BodyRegion, tuple[str, ...]] = {
    BodyRegion.CHEST: (
        "27925004",  # Nodule
        "4147007",  # Mass
        "52988006",  # Lesion
        "95436008",  # Lung consolidation
        "46621007",  # Atelectasis
        "60046008",  # Pleural effusion
        "36118008",  # Pneumothorax
        "16838000",  # Pneumomediastinum
        "19242006",  # Pulmonary edema
        "87433001",  # Pulmonary emphysema
        "12295008",  # Bronchiectasis
        "59282003",  # Pulmonary embolism
        "8186001",  # Cardiomegaly
        "373945007",  # Pericardial effusion
        "30746006",  # Lymphadenopathy
        "125605004",  # Fracture of bone
    ),
    BodyRegion.HEAD: (
        "301766008",  # Lesion of brain
        "4147007",  # Mass
        "367643001",  # Cyst
        "50960005",  # Hemorrhage
        "1386000",  # Intracranial hemorrhage
        "274100004",  # Cerebral hemorrhage
        "21454007",  # Subarachnoid hemorrhage
        "35566002",  # Hematoma
        "55641003",  # Infarct
        "432504007",  # Cerebral infarction
        "79654002",  # Edema
        "230745008",  # Hydrocephalus
        "85659009",  # Aneurysm
        "125605004",  # Fracture of bone
    ),
    BodyRegion.ABDOMEN_PELVIS: (
        "367643001",  # Cyst
        "4147007",  # Mass
        "52988006",  # Lesion
        "44132006",  # Abscess
        "389026000",  # Ascites
        "95570007",  # Kidney stone
        "235919008",  # Gallbladder calculus
        "43064006",  # Hydronephrosis
        "81060008",  # Intestinal obstruction
        "74400008",  # Appendicitis
        "80515008",  # Hepatomegaly
        "16294009",  # Splenomegaly
        "67362008",  # Aortic aneurysm
        "30746006",  # Lymphadenopathy
        "50960005",  # Hemorrhage
        "125605004",  # Fracture of bone
    ),
    BodyRegion.MUSCULOSKELETAL: (
        "396275006",  # Osteoarthritis
        "125605004",  # Fracture of bone
        "87642003",  # Dislocation
        "298382003",  # Scoliosis deformity of spine
        "274152003",  # Spondylolisthesis
        "76107001",  # Spinal stenosis
        "4147007",  # Mass
        "52988006",  # Lesion
        "19227008",  # Foreign body
    ),
    BodyRegion.BREAST: (
        "399294002",  # Cyst of breast
        "4147007",  # Mass
        "129770007",  # Individual calcification
        "129769006",  # Calcification cluster
        "129792006",  # Architectural distortion of breast
        "129790003",  # Asymmetric breast tissue
        "129789007",  # Focal asymmetric breast tissue
        "129797000",  # Skin thickening of breast
        "129796009",  # Skin retraction of breast
        "443808008",  # Intramammary lymph node
        "127189005",  # Axillary lymphadenopathy
    ),
    BodyRegion.GENERAL: (
        "52988006",  # Lesion
        "4147007",  # Mass
        "27925004",  # Nodule
        "367643001",  # Cyst
        "18115005",  # Pathologic calcification
        "44132006",  # Abscess
        "50960005",  # Hemorrhage
        "79654002",  # Edema
        "125605004",  # Fracture of bone
        "19227008",  # Foreign body
    ),
}


@dataclass(frozen=True)
class CodeList:
    """The closed list one request offers: the codes of ``regions``, in order, each once."""

    regions: tuple[BodyRegion, ...]
    codes: Mapping[str, str]  # code -> meaning

    @property
    def words(self) -> str:
        """The region(s) as the schema and the notes say them: "the chest", "the chest and the
        abdomen and pelvis"."""
        return " and ".join(region.words for region in self.regions)

    def regions_of(self, code: str) -> list[BodyRegion]:
        """The regions whose list holds ``code`` (none: it is not one of our codes)."""
        return [region for region, listed in CODES_BY_REGION.items() if code in listed]


def code_list(regions: Iterable[BodyRegion]) -> CodeList:
    """The list for a study whose images show ``regions``: those regions' lists together (a
    chest-abdomen CT gets both), the general list only when no region is known."""
    named = set(regions)  # once: ``regions`` may be a generator
    known = [r for r in BodyRegion if r is not BodyRegion.GENERAL and r in named]
    chosen = tuple(known) or (BodyRegion.GENERAL,)
    codes: dict[str, str] = {}
    for region in chosen:
        for code in CODES_BY_REGION[region]:
            codes.setdefault(code, CONCEPTS[code])
    return CodeList(chosen, codes)


GENERAL_CODES = code_list([BodyRegion.GENERAL])

# Words of a header that name a region. Body Part Examined is a CS of PS3.16 CID 4031 defined
# terms (CHEST, HEAD, CSPINE, ABDOMENPELVIS, ...); descriptions are free text in any case.
_REGION_WORDS: tuple[tuple[re.Pattern[str], BodyRegion], ...] = (
    (re.compile(r"BREAST|MAMM|MAMMA", re.IGNORECASE), BodyRegion.BREAST),
    (re.compile(r"HEAD|BRAIN|CRAN|SKULL|NEURO|KOPF|SCH[AÄ]DEL|CEREB|STROKE", re.IGNORECASE), BodyRegion.HEAD),
    (
        re.compile(
            r"SPINE|SPINAL|VERTEB|SACRUM|COCCYX|KNEE|SHOULDER|ELBOW|WRIST|ANKLE|FEMUR|HUMER|TIBIA|"
            r"FIBULA|FOREARM|CLAVICLE|SCAPULA|PATELLA|FINGER|EXTREMIT|\bHIP|\bHAND|\bFOOT|\bFEET|\bHEEL|"
            r"\bTOE|\bLEG\b|\bARM\b|\bMSK\b|\bJOINT",
            re.IGNORECASE,
        ),
        BodyRegion.MUSCULOSKELETAL,
    ),
    (re.compile(r"CHEST|THORA|LUNG|PULM|\bTHX|HEART|CARDIAC|\bRIB", re.IGNORECASE), BodyRegion.CHEST),
    (
        re.compile(
            r"ABD|PELVI|\bLIVER|HEPAT|RENAL|KIDNEY|BAUCH|BLADDER|PANCREA|COLON|BOWEL|PROSTATE|\bUTER|SPLEEN",
            re.IGNORECASE,
        ),
        BodyRegion.ABDOMEN_PELVIS,
    ),
)
_CT_ANATOMY_REGIONS = {
    "HEAD": BodyRegion.HEAD,
    "CHEST": BodyRegion.CHEST,
    "ABDOMEN": BodyRegion.ABDOMEN_PELVIS,
}


def regions_named(text: str) -> list[BodyRegion]:
    """The regions ``text`` names (a Body Part Examined, a description), in BodyRegion order."""
    found = {region for words, region in _REGION_WORDS if words.search(text)}
    return [region for region in BodyRegion if region in found]


def _header_text(ds: Dataset, keyword: str) -> str:
    """An element as text; "" when it is absent or cannot be read (a header that says nothing
    usable names no region, it does not stop the study)."""
    try:
        return str(ds.get(keyword, "") or "")
    except Exception:
        return ""


def series_regions(ds: Dataset, values: NDArray[np.floating] | None = None) -> tuple[list[BodyRegion], str]:
    """The body region(s) a series shows, from one of its headers (and, for CT, one slice in HU),
    with the reason; [GENERAL] when nothing says."""
    modality = _header_text(ds, "Modality").strip().upper()
    if modality == "MG":
        return [BodyRegion.BREAST], "modality MG"
    for keyword in ("BodyPartExamined", "SeriesDescription", "ProtocolName", "StudyDescription"):
        text = _header_text(ds, keyword)
        found = regions_named(text)
        if found:
            return found, f"{keyword} {text.strip()[:64]!r}" if keyword == "BodyPartExamined" else keyword
    if modality == "CT":
        try:
            judged = ct_anatomy(ds, values)
        except Exception:  # the same header was good enough for the windows; never fail here
            judged = None
        if judged is not None and judged[0] in _CT_ANATOMY_REGIONS:
            return [_CT_ANATOMY_REGIONS[judged[0]]], judged[1]
    return [BodyRegion.GENERAL], "no body region named"
