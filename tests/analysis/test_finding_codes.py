"""The closed code lists per body region (issue 11): the schema offers only the study's region's
list, reading a reply keeps only a code on that list, and the simulator codes from what the
request offers."""

from __future__ import annotations

from typing import Any

import pytest
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.sr import _concepts_dict

from analysis.finding_codes import (
    CODES_BY_REGION,
    CONCEPTS,
    GENERAL_CODES,
    BodyRegion,
    code_list,
    series_regions,
)
from analysis.findings import Findings, findings_schema
from analysis.vision.reading import read_findings
from analysis.vision.simulated_model import Answering
from analysis.vision.simulator import simulated_findings

CHEST = code_list([BodyRegion.CHEST])
HEAD = code_list([BodyRegion.HEAD])
# The codes the single list offered before the lists per region: findings stored with them
# (queue.stored_findings) must still load.
EARLIER_CODES = [
    "27925004",
    "4147007",
    "52988006",
    "95436008",
    "46621007",
    "60046008",
    "36118008",
    "19242006",
    "87433001",
    "8186001",
    "125605004",
    "50960005",
    "55641003",
]


def _header(**values: Any) -> Dataset:
    """A header as files bring them, valid or not (pydicom only warns when it reads them)."""
    ds = Dataset()
    with config.disable_value_validation():
        for keyword, value in values.items():
            setattr(ds, keyword, value)
    return ds


def _offered(schema: dict[str, Any]) -> list[str]:
    code = schema["properties"]["findings"]["items"]["properties"]["finding_code"]
    enum: list[str] = code["anyOf"][0]["enum"]
    return enum


def test_every_listed_concept_has_one_meaning_and_pydicoms_where_pydicom_knows_it() -> None:
    known: dict[str, set[str]] = {}
    sct: dict[str, dict[str, tuple[str, Any]]] = _concepts_dict.concepts["SCT"]  # type: ignore[assignment]
    for by_name in sct.values():
        for code, (meaning, _) in by_name.items():
            known.setdefault(code, set()).add(meaning.lower().removesuffix(" (disorder)"))
    for region, listed in CODES_BY_REGION.items():
        assert len(set(listed)) == len(listed), region
        assert set(listed) <= set(CONCEPTS), region
    assert set(CONCEPTS) == {code for listed in CODES_BY_REGION.values() for code in listed}
    for code, meaning in CONCEPTS.items():
        assert code.isdigit() and 6 <= len(code) <= 18 and len(meaning) <= 64  # SCTID, LO
        if code in known:
            assert meaning.lower() in known[code], (code, meaning, known[code])
    assert set(EARLIER_CODES) <= set(CONCEPTS)
    firsts = [listed[0] for listed in CODES_BY_REGION.values()]
    assert len(set(firsts)) == len(firsts)  # what the simulator answers tells the lists apart


def test_a_head_ct_is_offered_hemorrhage_and_infarct_never_pneumothorax() -> None:
    regions, reason = series_regions(_header(Modality="CT", BodyPartExamined="HEAD"))
    assert (regions, reason) == ([BodyRegion.HEAD], "BodyPartExamined 'HEAD'")
    offered = _offered(findings_schema([(512, 512)], "fraction", code_list(regions)))
    assert {"1386000", "50960005", "55641003", "432504007"} <= set(offered)  # hemorrhage, infarct
    assert "36118008" not in offered and "60046008" not in offered  # pneumothorax, pleural effusion
    chest = _offered(findings_schema([(512, 512)], "fraction", CHEST))
    assert "36118008" in chest and "1386000" not in chest and "55641003" not in chest


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ({"Modality": "CR", "BodyPartExamined": "CHEST"}, [BodyRegion.CHEST]),
        (
            {"Modality": "CT", "BodyPartExamined": "CHESTABDOMEN"},
            [BodyRegion.CHEST, BodyRegion.ABDOMEN_PELVIS],
        ),
        ({"Modality": "MR", "BodyPartExamined": "LSPINE"}, [BodyRegion.MUSCULOSKELETAL]),
        ({"Modality": "DX", "BodyPartExamined": "KNEE"}, [BodyRegion.MUSCULOSKELETAL]),
        ({"Modality": "MG"}, [BodyRegion.BREAST]),
        ({"Modality": "MR", "SeriesDescription": "t2 tse ax brain"}, [BodyRegion.HEAD]),
        ({"Modality": "CT", "SeriesDescription": "Abd/Pelvis 5mm"}, [BodyRegion.ABDOMEN_PELVIS]),
        ({"Modality": "CT", "WindowCenter": 40, "WindowWidth": 80}, [BodyRegion.HEAD]),  # a brain window
        ({"Modality": "cr ", "BodyPartExamined": " chest"}, [BodyRegion.CHEST]),  # written carelessly
        (
            {"Modality": "CT", "BodyPartExamined": ["HEAD", "NECK"]},
            [BodyRegion.HEAD],
        ),  # VM 2, against the rules
        ({"Modality": "MG", "BodyPartExamined": "CHEST"}, [BodyRegion.BREAST]),
        ({"Modality": "CR", "BodyPartExamined": "XYZZY"}, [BodyRegion.GENERAL]),
        ({"Modality": "OT", "SeriesDescription": "Janeth Qzvort protocol"}, [BodyRegion.GENERAL]),
        ({}, [BodyRegion.GENERAL]),
    ],
)
def test_the_body_region_is_read_from_the_header(header: dict[str, Any], expected: list[BodyRegion]) -> None:
    assert series_regions(_header(**header))[0] == expected


class _Unreadable(Dataset):
    def get(self, key: Any, default: Any = None) -> Any:
        raise ValueError(f"{key}: invalid value for its VR")


def test_a_header_that_cannot_be_read_names_no_region_and_fails_nothing() -> None:
    assert series_regions(_Unreadable()) == ([BodyRegion.GENERAL], "no body region named")


def test_a_study_of_two_regions_is_offered_both_and_general_only_when_none_is_known() -> None:
    both = code_list([BodyRegion.ABDOMEN_PELVIS, BodyRegion.GENERAL, BodyRegion.CHEST])
    assert both.regions == (BodyRegion.CHEST, BodyRegion.ABDOMEN_PELVIS)
    assert {"36118008", "389026000"} <= set(both.codes) and "1386000" not in both.codes
    assert code_list(r for r in [BodyRegion.HEAD, BodyRegion.CHEST]).regions == (
        BodyRegion.CHEST,
        BodyRegion.HEAD,
    )
    assert code_list([]) == code_list([BodyRegion.GENERAL]) == GENERAL_CODES
    assert "36118008" not in GENERAL_CODES.codes  # no region: nothing region-specific is offered


def _reply(code: Any, description: str = "Hyperdense focus over the left apex") -> dict[str, Any]:
    return {
        "summary": "s",
        "findings": [{"description": description, "assertion": "present", "finding_code": code}],
    }


def test_a_chest_reply_coding_a_head_concept_keeps_the_words_uncoded_with_a_note() -> None:
    findings = read_findings(_reply("1386000"), [(512, 512)], "fraction", CHEST)
    (finding,) = findings.findings
    assert finding.finding_code is None
    assert finding.description == "Hyperdense focus over the left apex"
    assert finding.notes == (
        "The model coded this finding 1386000 (Intracranial hemorrhage), which is not on the list for "
        "the chest it was given; the finding is not coded.",
    )


@pytest.mark.parametrize(
    ("code", "kept", "note"),
    [
        ("36118008", "36118008", None),
        (" 36118008\n", "36118008", None),  # spaces around a code still name it
        (36118008, "36118008", None),  # so does a JSON integer
        ("", None, None),
        ("   ", None, None),
        (None, None, None),
        ("3611 8008", None, "The model's code '3611 8008' is not on the list it was given"),
        ("36118008 Pneumothorax", None, "is not on the list it was given"),
        ("SCT:36118008", None, "is not on the list it was given"),
        ("99999999", None, "The model's code '99999999' is not on the list"),
        pytest.param("1" * 5000, None, "'" + "1" * 40 + "...'", id="a-string-of-5000-digits"),
        pytest.param(10**5000, None, "<a JSON int>", id="an-integer-of-5000-digits"),
        (36118008.0, None, "<a JSON float>"),
        (True, None, "<a JSON bool>"),
        ({"code": "36118008"}, None, "<a JSON dict>"),
        (["36118008"], None, "<a JSON list>"),
        ("\x00\ud800", None, "'\\x00\\ud800'"),
    ],
)
def test_a_code_is_kept_only_when_it_is_exactly_one_on_the_list(
    code: Any, kept: str | None, note: str | None
) -> None:
    findings = read_findings(_reply(code), [(512, 512)], "fraction", CHEST)
    (finding,) = findings.findings
    assert finding.finding_code == kept
    if note is None:
        assert finding.notes == ()
    else:
        (written,) = finding.notes
        assert note in written and written.endswith("the finding is not coded.")
    Findings.model_validate_json(findings.model_dump_json())  # stored and read back as the worker does


def test_the_simulator_codes_from_the_list_the_request_offers() -> None:
    """It answers from the schema the request carries: a head request gets a head code (the
    list's first, the last at the schema's edges), never the general list's."""
    for codes in (HEAD, CHEST, GENERAL_CODES):
        for boundary, index in ((False, 0), (True, -1)):
            data = simulated_findings(images=1, answering=Answering(boundary=boundary), codes=codes)
            assert data["findings"][0]["finding_code"] == list(codes.codes)[index]
            kept = read_findings(data, [(512, 512)], "fraction", codes)
            assert kept.findings[0].finding_code == list(codes.codes)[index]
    assert simulated_findings(images=1, codes=HEAD)["findings"][0]["finding_code"] == "301766008"
