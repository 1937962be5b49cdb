"""The Findings model and the schema sent to providers agree."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from analysis.findings import FINDINGS_SCHEMA, Findings
from analysis.vision.simulator import simulated_findings


def _walk(schema: dict[str, Any]) -> list[dict[str, Any]]:
    found = [schema]
    for value in schema.get("properties", {}).values():
        found += _walk(value)
    if "items" in schema:
        found += _walk(schema["items"])
    for option in schema.get("anyOf", []):
        found += _walk(option)
    return found


def test_schema_is_strict_mode_compatible() -> None:
    for node in _walk(FINDINGS_SCHEMA):
        if node.get("type") == "object":
            assert node["additionalProperties"] is False
            assert sorted(node["required"]) == sorted(node["properties"])


def test_simulated_findings_validate_and_the_model_rejects_what_the_schema_forbids() -> None:
    good = simulated_findings(images=1)
    Findings.model_validate(good)
    mutations: list[tuple[Callable[[dict[str, Any]], object], str]] = [
        (lambda d: d.update(extra="x"), "Extra inputs are not permitted"),
        (lambda d: d.update(overall_urgency=6), "less than or equal to 5"),
        (lambda d: d["findings"][0].update(confidence=1.5), "less than or equal to 1"),
        (lambda d: d["findings"][0]["box"].update(x_min=0.9), "x_min < x_max"),
        (lambda d: d["findings"][0].update(laterality="up"), "laterality"),
        (lambda d: d["findings"][0].pop("recommendation"), "recommendation"),
    ]
    for mutate, message in mutations:
        bad = copy.deepcopy(good)
        mutate(bad)
        with pytest.raises(ValidationError, match=message):
            Findings.model_validate(bad)
