"""What the model must answer: the findings schema, built per request, and the Findings we keep.

Two halves that must agree:

* :func:`findings_schema` is what the model is shown, in every structured mode (``json_schema``
  ``response_format``, an Anthropic tool's ``input_schema``, or written out in the system message
  for ``json_object`` servers). It is built for one request: ``image_index`` runs from 1 to the
  number of images sent, box coordinates within the preset's convention, certainty 0..1, urgency
  1..5. It keeps to the subset OpenAI's ``strict`` mode accepts (every property required,
  ``additionalProperties: false``, nullable as a type union, no ``minLength``), which Gemini's
  OpenAI-compatible endpoint and Anthropic's tools also take.
* :class:`Findings` is what the node keeps after reading a reply (:mod:`analysis.vision.reading`):
  a reply that satisfies the schema always reads, and one bad finding loses only what is wrong
  with it (its region, its certainty), said in plain words in its ``notes``, never the study.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from analysis.finding_codes import CONCEPTS, GENERAL_CODES, CodeList
from conf.providers import BoxConvention


class StudyQuality(enum.StrEnum):
    DIAGNOSTIC = "diagnostic"
    LIMITED = "limited"
    NON_DIAGNOSTIC = "non_diagnostic"


class Laterality(enum.StrEnum):
    LEFT = "left"
    RIGHT = "right"
    BILATERAL = "bilateral"
    MIDLINE = "midline"
    NOT_APPLICABLE = "not_applicable"


class Severity(enum.StrEnum):
    NORMAL = "normal"
    MILD = "mild"
    MODERATE = "moderate"
    SEVERE = "severe"
    CRITICAL = "critical"


class Assertion(enum.StrEnum):
    """Whether the model says the finding is there: an absent one is a pertinent negative ("no
    pneumothorax") and is never coded or drawn as a finding."""

    PRESENT = "present"
    ABSENT = "absent"
    UNCERTAIN = "uncertain"


class Box(BaseModel):
    """A rectangle in fractions (0..1) of the image that was sent, x to the right, y down, with
    a non-zero area (what reading a reply makes of any box convention)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    x_min: float = Field(ge=0, le=1)
    y_min: float = Field(ge=0, le=1)
    x_max: float = Field(ge=0, le=1)
    y_max: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> Box:
        if self.x_max <= self.x_min or self.y_max <= self.y_min:
            raise ValueError(
                f"box must have x_min < x_max and y_min < y_max, got "
                f"({self.x_min}, {self.y_min}, {self.x_max}, {self.y_max})"
            )
        return self


class Finding(BaseModel):
    """One finding as kept: the model's words always; what could not be used is ``None`` and
    said in ``notes``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str = Field(min_length=1)
    assertion: Assertion | None = None  # None: the model did not say (read as uncertain)
    # a code of the closed list the request offered (analysis.finding_codes), as the model chose it
    finding_code: str | None = None
    body_site: str | None = None
    laterality: Laterality | None = None
    image_index: int | None = Field(default=None, ge=1)  # None: the region could not be placed
    box: Box | None = None
    confidence: float | None = Field(default=None, ge=0, le=1)
    severity: Severity | None = None
    recommendation: str | None = None
    notes: tuple[str, ...] = ()  # what was dropped from the model's answer, and why

    @property
    def absent(self) -> bool:
        return self.assertion is Assertion.ABSENT

    @model_validator(mode="after")
    def _box_needs_image(self) -> Finding:
        if self.finding_code is not None and self.finding_code not in CONCEPTS:
            raise ValueError(f"finding_code {self.finding_code!r} is in none of the closed lists")
        if self.box is not None and self.image_index is None:
            raise ValueError("a finding with a box must name its image (image_index)")
        return self


class Findings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    study_quality: StudyQuality | None = None
    summary: str = Field(min_length=1)
    overall_urgency: int | None = Field(default=None, ge=1, le=5)
    findings: list[Finding] = Field(default_factory=list, max_length=50)
    notes: tuple[str, ...] = ()  # study-level: findings of the reply that could not be read at all


MAX_FINDINGS = 50


def box_sentence(convention: BoxConvention) -> str:
    """The one sentence that states the box convention, used by the system message and the
    schema alike so the two never disagree."""
    if convention == "per_mille":
        return (
            "Box coordinates are integers from 0 to 1000: thousandths of the width (x, to the right) and "
            "height (y, down) of the image the finding is on."
        )
    if convention == "pixel":
        return (
            "Box coordinates are pixels of the image the finding is on, as it was sent: x from 0 at the "
            "left edge to the image's width, y from 0 at the top edge to its height."
        )
    return (
        "Box coordinates are fractions from 0 to 1 of the width (x, to the right) and height (y, down) "
        "of the image the finding is on."
    )


def coordinate_ranges(
    convention: BoxConvention, image_sizes: Sequence[tuple[int, int]]
) -> tuple[float, float]:
    """The largest x and y a box may have in ``convention`` (pixels: the largest image sent)."""
    if convention == "per_mille":
        return 1000.0, 1000.0
    if convention == "pixel":
        return float(max(w for w, _ in image_sizes)), float(max(h for _, h in image_sizes))
    return 1.0, 1.0


def _enum(cls: type[enum.StrEnum]) -> dict[str, Any]:
    return {"type": "string", "enum": [member.value for member in cls]}


def findings_schema(
    image_sizes: Sequence[tuple[int, int]], convention: BoxConvention, codes: CodeList = GENERAL_CODES
) -> dict[str, Any]:
    """The JSON Schema for one request that sends images of ``image_sizes`` (width, height) of a
    study whose findings may be coded from ``codes`` (the closed list of its body region)."""
    if not image_sizes:
        raise ValueError('Argument "image_sizes" must name at least one image, got none')
    x_max, y_max = coordinate_ranges(convention, image_sizes)
    coordinate_type = "integer" if convention in ("per_mille", "pixel") else "number"

    def coordinate(limit: float, what: str) -> dict[str, Any]:
        bound: float | int = int(limit) if coordinate_type == "integer" else limit
        return {"type": coordinate_type, "minimum": 0, "maximum": bound, "description": what}

    box = {
        "type": "object",
        "description": "Region of the finding. " + box_sentence(convention),
        "properties": {
            "x_min": coordinate(x_max, "left edge"),
            "y_min": coordinate(y_max, "top edge"),
            "x_max": coordinate(x_max, "right edge, greater than x_min"),
            "y_max": coordinate(y_max, "bottom edge, greater than y_min"),
        },
        "required": ["x_min", "y_min", "x_max", "y_max"],
        "additionalProperties": False,
    }
    finding = {
        "type": "object",
        "properties": {
            "description": {"type": "string", "description": "The finding, in a radiologist's words."},
            "assertion": {
                "type": "string",
                "enum": [member.value for member in Assertion],
                "description": "present; absent for a pertinent negative (e.g. no pneumothorax); uncertain.",
            },
            "finding_code": {
                "anyOf": [{"type": "string", "enum": list(codes.codes)}, {"type": "null"}],
                "description": f"SNOMED CT code from the closed list for {codes.words}, only when"
                " the finding is present and one of these is exactly it: "
                + "; ".join(f"{code} {meaning}" for code, meaning in codes.codes.items())
                + ". Otherwise null.",
            },
            "body_site": {"type": "string", "description": "Anatomical site, e.g. right upper lobe."},
            "laterality": _enum(Laterality),
            "image_index": {
                "type": "integer",
                "minimum": 1,
                "maximum": len(image_sizes),
                "description": f"Number of the image the finding is on, 1 to {len(image_sizes)}.",
            },
            "box": {"anyOf": [box, {"type": "null"}]},
            "confidence": {
                "type": "number",
                "minimum": 0,
                "maximum": 1,
                "description": "Certainty that the finding is present, 0 to 1.",
            },
            "severity": _enum(Severity),
            "recommendation": {"type": ["string", "null"]},
        },
        "required": [
            "description",
            "assertion",
            "finding_code",
            "body_site",
            "laterality",
            "image_index",
            "box",
            "confidence",
            "severity",
            "recommendation",
        ],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "study_quality": _enum(StudyQuality),
            "summary": {"type": "string", "description": "A short narrative impression."},
            "overall_urgency": {
                "type": "integer",
                "minimum": 1,
                "maximum": 5,
                "description": "1 routine ... 5 critical, act now.",
            },
            "findings": {"type": "array", "maxItems": MAX_FINDINGS, "items": finding},
        },
        "required": ["study_quality", "summary", "overall_urgency", "findings"],
        "additionalProperties": False,
    }
