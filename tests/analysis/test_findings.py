"""The schema a request carries says what reading checks: every reply the schema allows reads,
and a reply that breaks one finding loses only that finding's broken part."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from analysis.findings import findings_schema
from analysis.vision.reading import UnusableReply, extract_json, read_findings
from analysis.vision.simulated_model import Answering, RequestRejected, check_strict_schema, instance
from analysis.vision.simulator import simulated_findings

SIZES = [(512, 512), (1024, 768)]


def _walk(schema: dict[str, Any]) -> list[dict[str, Any]]:
    found = [schema]
    for value in schema.get("properties", {}).values():
        found += _walk(value)
    if "items" in schema:
        found += _walk(schema["items"])
    for option in schema.get("anyOf", []):
        found += _walk(option)
    return found


@pytest.mark.parametrize("convention", ["fraction", "pixel", "per_mille"])
def test_the_schema_is_built_per_request_and_is_strict_mode_compatible(convention: Any) -> None:
    schema = findings_schema(SIZES, convention)
    check_strict_schema("findings", schema)  # OpenAI's strict subset, as the simulator enforces it
    for node in _walk(schema):
        if node.get("type") == "object":
            assert node["additionalProperties"] is False
            assert sorted(node["required"]) == sorted(node["properties"])
    finding = schema["properties"]["findings"]["items"]["properties"]
    assert (finding["image_index"]["minimum"], finding["image_index"]["maximum"]) == (1, 2)
    assert (finding["confidence"]["minimum"], finding["confidence"]["maximum"]) == (0, 1)
    urgency = schema["properties"]["overall_urgency"]
    assert (urgency["minimum"], urgency["maximum"]) == (1, 5)
    box = finding["box"]["anyOf"][0]["properties"]
    expected = {"fraction": (1.0, 1.0), "pixel": (1024, 768), "per_mille": (1000, 1000)}[convention]
    assert (box["x_max"]["maximum"], box["y_max"]["maximum"]) == expected


def test_strict_mode_refuses_what_openai_refuses() -> None:
    schema = findings_schema(SIZES, "fraction")
    loose = copy.deepcopy(schema)
    loose["properties"]["summary"]["minLength"] = 1
    with pytest.raises(RequestRejected, match="'minLength' is not permitted"):
        check_strict_schema("findings", loose)
    optional = copy.deepcopy(schema)
    optional["required"].remove("overall_urgency")
    with pytest.raises(RequestRejected, match="Missing \\['overall_urgency'\\]"):
        check_strict_schema("findings", optional)


@pytest.mark.parametrize("convention", ["fraction", "pixel", "per_mille"])
@pytest.mark.parametrize("boundary", [False, True])
def test_every_instance_of_the_schema_reads(convention: Any, boundary: bool) -> None:
    """The simulator's answers at the schema's edges (highest index, box of no area, 1.0) read."""
    schema = findings_schema(SIZES, convention)
    reply = instance(schema, Answering(boundary=boundary, findings=3))
    findings = read_findings(reply, SIZES, convention)
    assert len(findings.findings) == 3
    for finding in findings.findings:
        assert finding.image_index == (2 if boundary else 1)
        if boundary:  # x_min == x_max: no area, so no region, and the SR says why
            assert finding.box is None and finding.notes == (
                "The model's region is not shown: it has no area inside the image.",
            )
        else:
            assert finding.box is not None and finding.notes == ()


def _reply(**finding: Any) -> dict[str, Any]:
    data = simulated_findings(images=2)
    data["findings"][0].update(finding)
    return data


@pytest.mark.parametrize(
    ("change", "index", "box", "note"),
    [
        ({"image_index": 0}, None, None, "placed this finding on image 0, but 2 image(s) were sent"),
        ({"image_index": 3}, None, None, "placed this finding on image 3, but 2 image(s) were sent"),
        ({"image_index": "two"}, None, None, "placed this finding on image 'two'"),
        (
            {"box": {"x_min": 0.6, "y_min": 0.2, "x_max": 0.4, "y_max": 0.5}},
            1,
            None,
            "edges are in the wrong order",
        ),
        (
            {"box": {"x_min": 1.2, "y_min": 1.1, "x_max": 1.5, "y_max": 1.9}},
            1,
            None,
            "no area inside the image",
        ),
        (
            {"box": {"x_min": -0.2, "y_min": 0.1, "x_max": 0.4, "y_max": 1.3}},
            1,
            (0.0, 0.1, 0.4, 1.0),
            "cut to the image's edges",
        ),
        (
            {"box": {"x_min": float("nan"), "y_min": 0.1, "x_max": 0.4, "y_max": 0.3}},
            1,
            None,
            "no usable x_min",
        ),
        ({"box": [0.1, 0.1, 0.2, 0.2]}, 1, None, "not a box of four coordinates"),
        ({"confidence": 85}, 1, (0.3, 0.3, 0.45, 0.42), "certainty 85 is not between 0 and 1"),
    ],
)
def test_one_bad_part_of_a_finding_loses_only_that_part(
    change: dict[str, Any], index: int | None, box: tuple[float, ...] | None, note: str
) -> None:
    data = _reply(**change)
    findings = read_findings(json.loads(json.dumps(data)), SIZES, "fraction")
    (finding,) = findings.findings
    assert finding.description == data["findings"][0]["description"]  # the model's words kept
    assert finding.image_index == index
    assert (None if finding.box is None else tuple(finding.box.model_dump().values())) == box
    assert any(note in text for text in finding.notes), finding.notes


def test_extra_keys_and_unknown_enums_are_ignored_not_fatal() -> None:
    data = _reply(laterality="up", severity="grave", extra="x")
    data["reasoning"] = "the model's own key"
    data["study_quality"] = "good"
    findings = read_findings(data, SIZES, "fraction")
    (finding,) = findings.findings
    assert (finding.laterality, finding.severity, findings.study_quality) == (None, None, None)


def test_a_finding_without_words_is_dropped_and_said_but_the_rest_stay() -> None:
    data = simulated_findings(images=2, answering=Answering(findings=3))
    data["findings"][1]["description"] = ""
    data["findings"][2] = "not an object"
    findings = read_findings(data, SIZES, "fraction")
    assert len(findings.findings) == 1
    assert findings.notes == (
        "The model's reply listed 3 finding(s); 2 could not be read and are not shown "
        "(finding 2 has no description; finding 3 is not an object).",
    )


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("I see a nodule in the right upper lobe.", "holds no JSON object"),
        ('{"summary": "cut off', "cut off before its end"),
        ("[1, 2, 3]", "holds no JSON object"),
        ("{" * 100_000 + "}" * 100_000, "cut off|no JSON"),
        ('"x"' + " " * 1_000_000, "over 1000000"),
    ],
)
def test_replies_without_a_json_object_are_unusable(text: str, match: str) -> None:
    with pytest.raises(UnusableReply, match=match):
        extract_json(text)


@pytest.mark.parametrize(
    "wrap",
    [
        "{}",
        "```json\n{}\n```",
        "```\n{}\n```",
        "Here are the findings:\n{}\nI hope this helps.",
        "Sure! ```json\n{}``` Anything else?",
    ],
)
def test_json_in_fences_or_after_prose_is_found(wrap: str) -> None:
    data = simulated_findings(images=1)
    assert extract_json(wrap.replace("{}", json.dumps(data))) == data


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (
            {"impression": "x", "observations": []},
            'no "summary" text \\(its keys: impression, observations\\)',
        ),
        ({"summary": "x", "findings": "none"}, '"findings" is not a list'),
        ({"summary": "x", "findings": [{"finding": "y"}]}, "none of the 1 findings can be read"),
        ({"summary": "x" * 30_000, "findings": []}, "over 20000"),
    ],
)
def test_a_reply_with_no_usable_structure_is_unusable(data: dict[str, Any], match: str) -> None:
    with pytest.raises(UnusableReply, match=match):
        read_findings(data, SIZES, "fraction")


def test_a_two_megabyte_description_is_kept_cut_with_a_marker() -> None:
    data = _reply(description="nodule " * 300_000)
    (finding,) = read_findings(data, SIZES, "fraction").findings
    assert finding.description.startswith("nodule nodule")
    assert finding.description.endswith("[cut here: the model wrote 2099999 characters]")


@pytest.mark.parametrize(
    ("convention", "box", "expected"),
    [
        ("per_mille", {"x_min": 250, "y_min": 100, "x_max": 500, "y_max": 400}, (0.25, 0.1, 0.5, 0.4)),
        ("pixel", {"x_min": 256, "y_min": 192, "x_max": 512, "y_max": 384}, (0.25, 0.25, 0.5, 0.5)),
    ],
)
def test_boxes_are_read_in_the_presets_convention(
    convention: Any, box: dict[str, float], expected: tuple[float, ...]
) -> None:
    data = _reply(image_index=2, box=box)
    (finding,) = read_findings(data, SIZES, convention).findings
    assert finding.box is not None and tuple(finding.box.model_dump().values()) == expected


@pytest.mark.parametrize(
    ("field", "digits", "note"),
    [
        ("image_index", 400, "placed this finding on image"),  # past float: 1e399 as an integer
        ("image_index", 5_000, "placed this finding on image"),  # past int()'s 4300-digit limit
        ("confidence", 400, "certainty"),
        ("x_max", 400, "no usable x_max"),
        ("x_max", 5_000, "no usable x_max"),
    ],
)
def test_an_integer_too_large_for_a_float_loses_only_its_part(field: str, digits: int, note: str) -> None:
    data = _reply()
    placeholder = 123456789
    if field == "x_max":
        data["findings"][0]["box"]["x_max"] = placeholder
    else:
        data["findings"][0][field] = placeholder
    data["overall_urgency"] = placeholder
    text = json.dumps(data).replace(str(placeholder), "9" * digits)
    findings = read_findings(extract_json(text), SIZES, "fraction")
    (finding,) = findings.findings
    assert finding.description == data["findings"][0]["description"] and findings.overall_urgency is None
    assert any(note in text for text in finding.notes), finding.notes


def test_unpaired_surrogates_and_control_characters_are_replaced_not_fatal() -> None:
    text = json.dumps(_reply(description="nodule\\ud800 \x00left\x1b[0m", body_site="\x07lobe"))
    text = text.replace("\\\\ud800", "\\ud800")  # a lone surrogate escape, as a model may write
    data = extract_json(text.replace('"summary": "', '"summary": "\\udfff '))
    findings = read_findings(data, SIZES, "fraction")
    (finding,) = findings.findings
    assert finding.description == "nodule\ufffd  left [0m" and finding.body_site == "lobe"
    assert findings.summary.startswith("\ufffd SIMULATED")
    findings.summary.encode("utf-8")  # writable, as the SR must write it


def test_a_cut_off_reply_is_said_to_be_cut_off_not_read_from_an_inner_object() -> None:
    text = json.dumps(simulated_findings(images=1))
    box = '"box": {"x_min": 0.1, "y_min": 0.1, "x_max": 0.2, "y_max": 0.2}, "sev'
    cut = text[: text.index('"body_site"')] + box  # one whole inner object, then the cut
    with pytest.raises(UnusableReply, match="cut off"):
        extract_json(cut)
