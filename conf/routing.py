"""Routing: which studies are analysed, how urgently, by which model, and where the SR goes.

First match wins, in file order. Each list is "any of" (empty matches anything) and compared
case-insensitively; a study matches when every non-empty criterion is met by at least one of
its instances. With routes configured, a study that matches none is stored and marked skipped;
with none configured, every study is analysed with the defaults.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class Route(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    calling_aets: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    action: Literal["analyse", "skip"] = "analyse"
    priority: int = 0  # higher is sooner; e.g. 10 for STAT
    provider: str | None = None  # else vision.provider
    model: str | None = None  # else vision.model
    base_url: str | None = None  # else vision.base_url for the same provider, the preset's for another
    # A route to another provider has its own key, never the default's (an OpenAI key must not
    # reach Anthropic): the variable named here holds it, read once at load (conf.load_settings).
    api_key_env: str | None = None
    api_key: SecretStr | None = None
    destinations: tuple[str, ...] = ()  # names from [[destinations]]; empty: all
    instructions: str = Field(default="", max_length=2000)  # appended to the prompt; nothing identifying


@dataclass(frozen=True)
class StudyFacts:
    """What routing may look at: header facts, never names or IDs."""

    modalities: frozenset[str]
    body_parts: frozenset[str]
    calling_aets: frozenset[str]
    sop_classes: frozenset[str]


def _hit(wanted: Sequence[str], present: Iterable[str]) -> bool:
    if not wanted:
        return True
    have = {p.upper() for p in present}
    return any(w.upper() in have for w in wanted)


def match(routes: Sequence[Route], facts: StudyFacts) -> Route | None:
    for route in routes:
        if (
            _hit(route.modalities, facts.modalities)
            and _hit(route.body_parts, facts.body_parts)
            and _hit(route.calling_aets, facts.calling_aets)
            and _hit(route.sop_classes, facts.sop_classes)
        ):
            return route
    return None
