"""Which windows, and which slab projection, a series is shown in.

CT: the windows configured for the body part (``imaging.ct_window_by_body_part``: chest in lung
and mediastinal windows, head in brain and subdural windows). Body Part Examined is often empty
or wrong, so when it names no configured part the anatomy is judged from the series itself: its
description (read locally, never sent), then a narrow brain window in the header, then the HU
histogram of a slice (a skull ring around brain-density tissue, narrower than a trunk). A head CT
without Body Part Examined therefore gets brain windows, never the mediastinal default.

Each window comes with the projection that suits what is sought in it (issue 12): maximum
intensity (MIP) where the findings are bright against dark (nodules in lung, bone), the average
where they are small differences of soft tissue (mediastinum, abdomen, brain, subdural blood).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

Projection = Literal["mip", "average", "minip"]

# Words of a projection as the manifest and the prompt both say them.
PROJECTION_WORDS: dict[str, str] = {
    "mip": "maximum intensity projection",
    "average": "average intensity projection",
    "minip": "minimum intensity projection",
}
PROJECTION_BY_CT_PRESET: dict[str, Projection] = {
    "lung": "mip",
    "bone": "mip",
    "mediastinum": "average",
    "soft_tissue": "average",
    "brain": "average",
    "subdural": "average",
    "stroke": "average",
}
PROJECTION_BY_MODALITY: dict[str, Projection] = {"PT": "mip", "NM": "mip"}  # MR and others: average
# MedGemma 1.5's CT input: one RGB image, R -1024..1024 HU, G -135..215, B 0..80 (center, width).
MEDGEMMA_RGB_WINDOWS: tuple[tuple[float, float], ...] = ((0.0, 2048.0), (40.0, 350.0), (40.0, 80.0))

_HEAD_WORDS = re.compile(r"HEAD|BRAIN|CRAN|SKULL|NEURO|KOPF|SCH[AÄ]DEL|CEREB|STROKE", re.IGNORECASE)
_CHEST_WORDS = re.compile(r"CHEST|THORA|LUNG|PULM|THX", re.IGNORECASE)
_ABDOMEN_WORDS = re.compile(r"ABD|PELVI|LIVER|RENAL|KIDNEY|BAUCH", re.IGNORECASE)
HEAD_MAX_WIDTH_MM = 220.0  # an adult head is 140-200 mm wide; a trunk is wider


@dataclass(frozen=True)
class WindowSpec:
    """One way of showing a series: a window (or three, as RGB) and the slab projection."""

    name: str  # "lung", "brain", "header", "percentiles", "rgb3" ...
    center: float
    width: float
    projection: Projection
    explanation: str  # why this window: "preset lung (Body Part Examined CHEST)"
    rgb: tuple[tuple[float, float], ...] | None = None  # three (center, width) for R, G, B

    def __post_init__(self) -> None:
        if not self.width >= 1:
            raise ValueError(f'Argument "width" must be at least 1, got {self.width}')

    @property
    def words(self) -> str:
        """The window as the manifest and the prompt say it."""
        if self.rgb is not None:
            channels = ", ".join(f"{c - w / 2:g}..{c + w / 2:g}" for c, w in self.rgb)
            return f"three CT windows as RGB (R, G, B: {channels} HU)"
        return f"{self.name.replace('_', ' ')} window (C {self.center:g}, W {self.width:g})"


def first_number(value: object) -> float | None:
    """The first value of a (possibly multi-valued) DS or IS element as a number, or None."""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0] if len(value) else None
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def header_window(ds: Dataset) -> tuple[float | None, float | None]:
    """The header's first window (Window Center, Window Width), each None when not a number."""
    return first_number(ds.get("WindowCenter")), first_number(ds.get("WindowWidth"))


def _body_width_mm(body: NDArray[np.bool_], ds: Dataset) -> float | None:
    spacing = ds.get("PixelSpacing")
    try:
        column_mm = float(spacing[1]) if spacing else None
    except (TypeError, ValueError, IndexError):
        column_mm = None
    if column_mm is None:
        return None
    per_column = body.sum(axis=0)
    if not per_column.any():
        return None
    wide = np.flatnonzero(per_column >= 0.05 * per_column.max())  # ignores the thin table
    return float(wide[-1] - wide[0] + 1) * column_mm


def ct_anatomy(ds: Dataset, values: NDArray[np.floating] | None) -> tuple[str, str] | None:
    """The body part a CT series shows, judged from the series (description, header window,
    HU histogram of ``values``, one slice in HU), with the reason; None when unsure."""
    for keyword in ("SeriesDescription", "ProtocolName", "StudyDescription"):
        text = str(ds.get(keyword, "") or "")
        for words, part in ((_HEAD_WORDS, "HEAD"), (_CHEST_WORDS, "CHEST"), (_ABDOMEN_WORDS, "ABDOMEN")):
            if words.search(text):
                return part, f"{keyword} names the {part.lower()}"
    center, width = header_window(ds)
    if center is not None and width is not None and 15 <= center <= 60 and 1 <= width <= 120:
        return "HEAD", f"the header's window is a brain window (C {center:g}, W {width:g})"
    if values is None or values.ndim != 2:
        return None
    body = values > -300
    count = int(body.sum())
    if count < 100:
        return None
    bone = float((values > 300).sum()) / count
    brain = float(((values > 15) & (values < 60)).sum()) / count
    body_width = _body_width_mm(body, ds)
    if bone >= 0.08 and brain >= 0.30 and (body_width is None or body_width <= HEAD_MAX_WIDTH_MM):
        return (
            "HEAD",
            f"HU histogram: a skull around brain-density tissue ({bone:.0%} bone, {brain:.0%} 15-60 HU)",
        )
    return None


def ct_window_names(
    ds: Dataset,
    values: NDArray[np.floating] | None,
    by_body_part: Mapping[str, Sequence[str]],
    default: str = "mediastinum",
) -> list[tuple[str, str]]:
    """The CT presets for this series, each with the reason it was chosen."""

    def names(part: str) -> tuple[str, ...]:
        configured = by_body_part[part]
        return (configured,) if isinstance(configured, str) else tuple(configured)

    body_part = str(ds.get("BodyPartExamined", "") or "").upper()
    if body_part in by_body_part:
        return [(name, f"Body Part Examined {body_part}") for name in names(body_part)]
    judged = ct_anatomy(ds, values)
    if judged is not None and judged[0] in by_body_part:
        part, reason = judged
        return [(name, f"{part.lower()}: {reason}") for name in names(part)]
    return [(default, "no body part known")]


def series_windows(
    ds: Dataset,
    values: NDArray[np.floating],
    by_body_part: Mapping[str, Sequence[str]],
    presets: Mapping[str, tuple[float, float]],
    rgb: bool = False,
) -> list[WindowSpec]:
    """The windows a volume is shown in, from one of its headers and one slice's values (after
    the modality LUT). First the one that matters most: it is the last a tight budget drops."""
    modality = str(ds.get("Modality", "")).upper()
    if modality == "CT":
        if rgb:
            return [WindowSpec("rgb3", 40.0, 350.0, "average", "MedGemma-style RGB", MEDGEMMA_RGB_WINDOWS)]
        specs = []
        for name, reason in ct_window_names(ds, values, by_body_part):
            if name not in presets:
                raise ValueError(f'CT window preset must be one of {sorted(presets)}, got "{name}"')
            center, width = presets[name]
            projection = PROJECTION_BY_CT_PRESET.get(name, "average")
            explanation = (
                f"preset {name}"
                if reason.startswith(("Body Part", "no body part"))
                else f"preset {name} ({reason})"
            )
            specs.append(WindowSpec(name, center, width, projection, explanation))
        return specs
    projection = PROJECTION_BY_MODALITY.get(modality, "average")
    header_center, header_width = header_window(ds)
    if header_center is not None and header_width is not None and header_width >= 1:
        return [WindowSpec("header", header_center, header_width, projection, "header")]
    low, high = (float(v) for v in np.percentile(values, (1.0, 99.0)))
    if not high > low:
        high = low + 1.0
    return [
        WindowSpec(
            "percentiles", float(low + high) / 2 + 0.5, float(high - low) + 1, projection, "percentiles 1-99"
        )
    ]
