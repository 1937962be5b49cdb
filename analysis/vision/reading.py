"""Reading a model's reply the way real models write it, and keeping all that can be kept.

Models put JSON inside ```json fences or after a sentence of prose even when told not to, and a
reply that satisfies the schema can still hold a box of zero area or on an image that was not
sent. The rules (issue "A first real run that works"):

* :func:`extract_json` finds the one JSON object in the text; :class:`UnusableReply` when there
  is none (prose only, truncated, too large, nested past reason).
* :func:`read_findings` keeps every finding that has words. A finding whose ``image_index`` or box
  cannot be used keeps its text and loses only its region; an out-of-range box is clamped to the
  image, a zero-area, inverted or non-finite one is dropped; a certainty outside 0..1 is dropped,
  never rescaled; a code not on the closed list the request offered (another body region's, or
  none of ours) leaves the finding uncoded, in its words. Each loss is said in plain words in the
  finding's ``notes`` (the SR prints them). Only a reply with no usable structure (no summary, no
  findings list, or findings of which none has words) is :class:`UnusableReply`, which earns one
  repair request.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Sequence
from typing import Any, TypeVar

from analysis.finding_codes import CONCEPTS, GENERAL_CODES, CodeList
from analysis.findings import (
    MAX_FINDINGS,
    Assertion,
    Box,
    Finding,
    Findings,
    Laterality,
    Severity,
    StudyQuality,
)
from conf.providers import BoxConvention

MAX_REPLY_CHARS = 1_000_000  # a reply longer than this is a model gone wrong, not findings
MAX_OPENING_BRACES = 50  # where a JSON object after prose may start; bounds the work on garbage
MAX_SUMMARY_CHARS = 20_000
MAX_TEXT_CHARS = 8_000  # one finding's description or recommendation
MAX_INT_DIGITS = 400  # a longer integer is read as a float (inf), not refused by int()'s limit
_E = TypeVar("_E", StudyQuality, Laterality, Severity, Assertion)
_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)```", re.DOTALL)
# What no DICOM text value may hold: C0/C1 controls other than tab, LF and CR, and UTF-16
# surrogates left unpaired by a "\ud800" escape (they cannot even be encoded as UTF-8).
_UNWRITABLE = re.compile(r"[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f-\x9f]|[\ud800-\udfff]")


class UnusableReply(ValueError):
    """The reply has no usable findings structure; the message says why, in one line."""


def _parse_int(digits: str) -> int | float:
    """An integer of the reply; one past Python's digit limit (a ValueError that would discard
    the whole reply for one number) becomes a float, infinite if it must."""
    return int(digits) if len(digits) <= MAX_INT_DIGITS else float(digits)


def extract_json(text: str) -> Any:
    """The JSON object in ``text``: the whole text, a fenced block, or the first ``{...}`` that
    parses (after prose), preferring one with ``summary`` or ``findings``. A reply that starts as
    an object but does not parse is cut off or broken: an object nested inside it is not the
    answer."""
    if len(text) > MAX_REPLY_CHARS:
        raise UnusableReply(f"the reply is {len(text)} characters long, over {MAX_REPLY_CHARS}")
    stripped = text.strip()
    if not stripped:
        raise UnusableReply("the reply is empty")
    decoder = json.JSONDecoder(parse_int=_parse_int)
    candidates = [stripped, *(m.group(1).strip() for m in _FENCE.finditer(stripped))]
    for candidate in candidates:
        try:
            value = decoder.decode(candidate)
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    first: dict[str, Any] | None = None
    for match in itertools.islice(re.finditer(r"\{", stripped), MAX_OPENING_BRACES):
        try:
            value, _ = decoder.raw_decode(stripped, match.start())
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict):
            if "summary" in value or "findings" in value:
                return value
            first = value if first is None else first
    if stripped.startswith("{"):
        raise UnusableReply("the reply is a JSON object cut off before its end (truncated?)")
    if first is not None:
        return first
    raise UnusableReply("the reply holds no JSON object: " + _excerpt(stripped))


def _excerpt(text: str, limit: int = 120) -> str:
    flat = " ".join(text.split())
    return repr(flat[:limit] + ("..." if len(flat) > limit else ""))


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer past the largest float
        return None
    return number if math.isfinite(number) else None


def _text(value: Any, limit: int) -> str | None:
    if not isinstance(value, str):
        return None
    text = _UNWRITABLE.sub(lambda m: "\ufffd" if m.group() >= "\ud800" else " ", value).strip()
    if not text:
        return None
    if len(text) > limit:
        return text[:limit] + f" [cut here: the model wrote {len(text)} characters]"
    return text


def _member(cls: type[_E], value: Any) -> _E | None:
    if not isinstance(value, str):
        return None
    key = value.strip().lower().replace("-", "_").replace(" ", "_")
    try:
        return cls(key)
    except ValueError:
        return None


def _index(value: Any) -> int | None:
    number = _finite(value)
    return int(number) if number is not None and number == int(number) else None


def _read_box(raw: Any, size: tuple[int, int], convention: BoxConvention, notes: list[str]) -> Box | None:
    """``raw`` in the preset's convention to fractions of the image sent; clamped to the image,
    dropped (with a note) when it has no area or is not four finite numbers."""
    if not isinstance(raw, dict):
        notes.append("The model's region is not a box of four coordinates and is not shown.")
        return None
    values: dict[str, float] = {}
    for key in ("x_min", "y_min", "x_max", "y_max"):
        number = _finite(raw.get(key))
        if number is None:
            notes.append(f"The model's region has no usable {key} ({raw.get(key)!r}) and is not shown.")
            return None
        if convention == "per_mille":
            number /= 1000
        elif convention == "pixel":
            number /= size[0] if key.startswith("x") else size[1]
        values[key] = number
    clamped = {key: min(max(value, 0.0), 1.0) for key, value in values.items()}
    if clamped["x_max"] <= clamped["x_min"] or clamped["y_max"] <= clamped["y_min"]:
        reason = (
            "its edges are in the wrong order"
            if values["x_max"] < values["x_min"] or values["y_max"] < values["y_min"]
            else "it has no area inside the image"
        )
        notes.append(f"The model's region is not shown: {reason}.")
        return None
    if clamped != values:
        notes.append("The model's region reached outside the image and was cut to the image's edges.")
    return Box(**clamped)


def _read_code(raw: Any, codes: CodeList, notes: list[str]) -> str | None:
    """The model's code when it is on the closed list the request offered (``codes``); any other
    (another region's, or none of ours) leaves the finding uncoded, said in ``notes``. Spaces
    around a code, or a code written as a JSON integer, still name that code."""
    if isinstance(raw, str):
        code: str | None = raw.strip()
        shown = repr(raw[:40] + ("..." if len(raw) > 40 else ""))
    elif isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < 10**18:
        code = shown = str(raw)
    elif raw is None:
        return None
    else:  # a float, a huge integer, an object, a list: not a code, and not worth repeating
        code, shown = None, f"<a JSON {type(raw).__name__}>"
    if code == "":
        return None
    if code is not None and code in codes.codes:
        return code
    if code is not None and code in CONCEPTS:
        notes.append(
            f"The model coded this finding {code} ({CONCEPTS[code]}), which is not on the list for "
            f"{codes.words} it was given; the finding is not coded."
        )
    else:
        notes.append(f"The model's code {shown} is not on the list it was given; the finding is not coded.")
    return None


def _read_finding(
    raw: Any,
    number: int,
    image_sizes: Sequence[tuple[int, int]],
    convention: BoxConvention,
    codes: CodeList,
) -> Finding | str:
    """A :class:`Finding`, or why finding ``number`` of the reply cannot be kept at all."""
    if not isinstance(raw, dict):
        return f"finding {number} is not an object"
    description = _text(raw.get("description"), MAX_TEXT_CHARS)
    if description is None:
        return f"finding {number} has no description"
    notes: list[str] = []
    index = _index(raw.get("image_index"))
    box: Box | None = None
    if index is None or not 1 <= index <= len(image_sizes):
        if raw.get("image_index") is not None or raw.get("box") is not None:
            notes.append(
                f"The model placed this finding on image {raw.get('image_index')!r}, but "
                f"{len(image_sizes)} image(s) were sent; its region is not shown."
            )
        index = None
    elif raw.get("box") is not None:
        box = _read_box(raw["box"], image_sizes[index - 1], convention, notes)
    code = _read_code(raw.get("finding_code"), codes, notes)
    confidence = _finite(raw.get("confidence"))
    if raw.get("confidence") is not None and (confidence is None or not 0 <= confidence <= 1):
        notes.append(f"The model's certainty {raw.get('confidence')!r} is not between 0 and 1; not shown.")
        confidence = None
    return Finding(
        description=description,
        assertion=_member(Assertion, raw.get("assertion")),
        finding_code=code,
        body_site=_text(raw.get("body_site"), 200),
        laterality=_member(Laterality, raw.get("laterality")),
        image_index=index,
        box=box,
        confidence=confidence,
        severity=_member(Severity, raw.get("severity")),
        recommendation=_text(raw.get("recommendation"), MAX_TEXT_CHARS),
        notes=tuple(notes),
    )


def read_findings(
    data: Any,
    image_sizes: Sequence[tuple[int, int]],
    convention: BoxConvention,
    codes: CodeList = GENERAL_CODES,
) -> Findings:
    """Findings from a parsed reply to a request that sent images of ``image_sizes`` and offered
    ``codes`` (the closed list of the study's body region)."""
    if not isinstance(data, dict):
        raise UnusableReply(f"the reply is a JSON {type(data).__name__}, not an object")
    raw_summary = data.get("summary")
    if isinstance(raw_summary, str) and len(raw_summary) > MAX_SUMMARY_CHARS:
        raise UnusableReply(f"the summary is {len(raw_summary)} characters long, over {MAX_SUMMARY_CHARS}")
    summary = _text(raw_summary, MAX_SUMMARY_CHARS)
    if summary is None:
        keys = ", ".join(sorted(str(k) for k in data)[:12]) or "none"
        raise UnusableReply(f'the reply has no "summary" text (its keys: {keys})')
    raw_findings = data.get("findings")
    if not isinstance(raw_findings, list):
        raise UnusableReply(f'"findings" is not a list (got {type(raw_findings).__name__})')
    kept: list[Finding] = []
    dropped: list[str] = []
    for number, raw in enumerate(raw_findings, start=1):
        result = _read_finding(raw, number, image_sizes, convention, codes)
        if isinstance(result, str):
            dropped.append(result)
        elif len(kept) < MAX_FINDINGS:
            kept.append(result)
        else:
            dropped.append(f"finding {number} is past the first {MAX_FINDINGS}")
    if raw_findings and not kept:
        raise UnusableReply(f"none of the {len(raw_findings)} findings can be read: {'; '.join(dropped[:3])}")
    notes = (
        (
            f"The model's reply listed {len(raw_findings)} finding(s); {len(dropped)} could not be read "
            f"and are not shown ({'; '.join(dropped[:5])}).",
        )
        if dropped
        else ()
    )
    urgency = _index(data.get("overall_urgency"))
    return Findings(
        study_quality=_member(StudyQuality, data.get("study_quality")),
        summary=summary,
        overall_urgency=urgency if urgency is not None and 1 <= urgency <= 5 else None,
        findings=kept,
        notes=notes,
    )
