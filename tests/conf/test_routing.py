"""First-match routing rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from conf import ConfigError, load_settings
from conf.routing import Route, StudyFacts, match


def facts(modalities: set[str], body_parts: set[str] = frozenset(), ae: str = "CT01") -> StudyFacts:  # type: ignore[assignment]
    return StudyFacts(frozenset(modalities), frozenset(body_parts), frozenset({ae}), frozenset())


ROUTES = (
    Route(
        name="stat-head-ct",
        modalities=("CT",),
        body_parts=("HEAD", "BRAIN"),
        calling_aets=("ER_CT",),
        priority=10,
    ),
    Route(name="no-mammo", modalities=("MG",), action="skip"),
    Route(name="chest", body_parts=("chest",), provider="anthropic"),
    Route(name="any-ct", modalities=("CT",)),
)


def test_first_matching_route_wins_and_criteria_are_any_of_and_case_blind() -> None:
    assert match(ROUTES, facts({"CT"}, {"HEAD"}, "ER_CT")).name == "stat-head-ct"  # type: ignore[union-attr]
    assert match(ROUTES, facts({"CT"}, {"HEAD"}, "OTHER")).name == "any-ct"  # type: ignore[union-attr]
    assert match(ROUTES, facts({"CR", "SR"}, {"CHEST"})).name == "chest"  # type: ignore[union-attr]
    assert match(ROUTES, facts({"MG"})).action == "skip"  # type: ignore[union-attr]
    assert match(ROUTES, facts({"US"})) is None


def test_routes_load_from_toml_and_unknown_destinations_are_refused(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 104\n'
        '[[routes]]\nname = "ct"\nmodalities = ["CT"]\npriority = 5\ndestinations = ["pacs"]\n'
    )
    (route,) = load_settings(good).routes
    assert (route.name, route.priority, route.destinations) == ("ct", 5, ("pacs",))
    bad = tmp_path / "bad.toml"
    bad.write_text('[[routes]]\nname = "ct"\ndestinations = ["nowhere"]\n')
    with pytest.raises(ConfigError, match=r"destinations \['nowhere'\] are not in \[\[destinations\]\]"):
        load_settings(bad)
