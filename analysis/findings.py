"""What the model must answer: the Findings model and its JSON schema.

The schema is written out by hand in the subset every provider's structured mode accepts
(OpenAI ``strict``: every property required, ``additionalProperties: false``, nullable as a type
union; Anthropic tool ``input_schema``; Gemini's OpenAI-compatible ``json_schema``). A test
checks that the pydantic model accepts exactly what the schema describes.
"""

from __future__ import annotations

import enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


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


class Box(BaseModel):
    """A rectangle in fractions (0..1) of the image that was sent, x to the right, y down."""

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
    model_config = ConfigDict(frozen=True, extra="forbid")

    description: str = Field(min_length=1, max_length=2000)
    body_site: str = Field(min_length=1, max_length=200)
    laterality: Laterality
    image_index: int = Field(ge=1)
    box: Box | None
    confidence: float = Field(ge=0, le=1)
    severity: Severity
    recommendation: str | None = Field(max_length=2000)


class Findings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    study_quality: StudyQuality
    summary: str = Field(min_length=1, max_length=4000)
    overall_urgency: int = Field(ge=1, le=5)
    findings: list[Finding] = Field(max_length=50)


def _enum(cls: type[enum.StrEnum]) -> dict[str, Any]:
    return {"type": "string", "enum": [member.value for member in cls]}


BOX_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Region in fractions (0 to 1) of the image's width and height; x right, y down.",
    "properties": {name: {"type": "number"} for name in ("x_min", "y_min", "x_max", "y_max")},
    "required": ["x_min", "y_min", "x_max", "y_max"],
    "additionalProperties": False,
}

FINDINGS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "study_quality": _enum(StudyQuality),
        "summary": {"type": "string", "description": "A short narrative impression."},
        "overall_urgency": {"type": "integer", "description": "1 routine ... 5 critical, act now."},
        "findings": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "description": {"type": "string"},
                    "body_site": {"type": "string", "description": "Anatomical site, e.g. right upper lobe."},
                    "laterality": _enum(Laterality),
                    "image_index": {"type": "integer", "description": "1-based number of the image."},
                    "box": {"anyOf": [BOX_SCHEMA, {"type": "null"}]},
                    "confidence": {"type": "number", "description": "0 to 1."},
                    "severity": _enum(Severity),
                    "recommendation": {"type": ["string", "null"]},
                },
                "required": [
                    "description",
                    "body_site",
                    "laterality",
                    "image_index",
                    "box",
                    "confidence",
                    "severity",
                    "recommendation",
                ],
                "additionalProperties": False,
            },
        },
    },
    "required": ["study_quality", "summary", "overall_urgency", "findings"],
    "additionalProperties": False,
}
