"""Which series, images and slices a model should see, from the header facts indexed at ingest.

Primary images only: no localizers, no DERIVED\\SECONDARY captures, no SR, KOS, presentation
states, RT objects or encapsulated documents (our own SRs included), and nothing whose header
says BurnedInAnnotation YES unless configured. A volume's slices (or a multi-frame's frames) are
ordered *by position along the slice normal*, not by Instance Number, which scanners number in
either direction or restart; :mod:`analysis.slabs` partitions them and :mod:`analysis.budget`
decides how much of the study the cost budget shows.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread

from analysis.pixel_privacy import Policy, at_risk, policy_for, risk_modality
from storage.models import Instance

VOLUME_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})
MIN_VOLUME_SLICES = 4
# A multi-frame that is no volume (an ultrasound or XA cine loop): this many frames evenly spaced
# in time, first and last included, as one mosaic, not only its middle frame.
CINE_FRAMES = 4
# SOP classes that carry no image to show (PS3.4 Annex B): SR and KOS, presentation states,
# RT objects, encapsulated documents, raw data, waveforms.
NON_IMAGE_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.481.",
    "1.2.840.10008.5.1.4.1.1.104.",
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.9.",
)


# The ``instances`` columns :meth:`SourceImage.from_instance` reads.
SOURCE_COLUMNS = (
    "sop_instance_uid",
    "series_instance_uid",
    "sop_class_uid",
    "path",
    "modality",
    "image_type",
    "instance_number",
    "image_position_patient",
    "image_orientation_patient",
    "rows",
    "columns",
    "number_of_frames",
    "burned_in_annotation",
    "body_part_examined",
    "view_position",
)


@dataclass(frozen=True)
class SourceImage:
    """One stored instance as the planner sees it."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    path: Path
    modality: str
    image_type: tuple[str, ...]
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    rows: int | None
    columns: int | None
    number_of_frames: int
    burned_in_annotation: str
    body_part_examined: str
    view_position: str

    @classmethod
    def from_instance(cls, row: Instance | Any, root: Path) -> SourceImage:
        """From an ``instances`` row (ORM object or Core row with the same column names)."""
        return cls.from_columns(tuple(getattr(row, name) for name in SOURCE_COLUMNS), root)

    @classmethod
    def from_columns(cls, values: Sequence[Any], root: Path) -> SourceImage:
        """From the values of :data:`SOURCE_COLUMNS`, in that order (a Core row of them)."""
        (
            sop_instance_uid,
            series_instance_uid,
            sop_class_uid,
            path,
            modality,
            image_type,
            instance_number,
            position,
            orientation,
            rows,
            columns,
            number_of_frames,
            burned_in_annotation,
            body_part_examined,
            view_position,
        ) = values
        return cls(
            sop_instance_uid=sop_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_class_uid=sop_class_uid,
            path=root / path,
            modality=(modality or "").upper(),
            image_type=_image_type(image_type or ""),
            instance_number=_int(instance_number),
            position=_floats(position, 3),  # type: ignore[arg-type]
            orientation=_orientation(orientation),  # type: ignore[arg-type]
            rows=rows,
            columns=columns,
            number_of_frames=max(_int(number_of_frames) or 1, 1),
            burned_in_annotation=(burned_in_annotation or "").upper(),
            body_part_examined=(body_part_examined or "").upper(),
            view_position=(view_position or "").upper(),
        )

    def along_normal(self) -> float | None:
        """Position along the slice normal (row x column direction cosines, PS3.3
        C.7.6.2.1.1), in mm. Plain arithmetic: numpy's cross costs 10 us a call here."""
        if self.position is None or self.orientation is None:
            return None
        rx, ry, rz, cx, cy, cz = self.orientation
        nx, ny, nz = ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx
        px, py, pz = self.position
        return nx * px + ny * py + nz * pz


def _int(text: str | None) -> int | None:
    try:
        return int(str(text).strip()) if text not in (None, "") else None
    except ValueError:
        return None


@functools.lru_cache(maxsize=256)
def _image_type(text: str) -> tuple[str, ...]:
    """Image Type's values (a series repeats one string: parsed once)."""
    return tuple(v.strip().upper() for v in text.split("\\") if v.strip())


@functools.lru_cache(maxsize=256)
def _orientation(text: str | None) -> tuple[float, ...] | None:
    """Image Orientation (a series repeats one string: parsed once)."""
    return _floats(text, 6)


def _floats(text: str | None, count: int) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        values = tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return None
    return values if len(values) == count and all(math.isfinite(v) for v in values) else None


@dataclass(frozen=True)
class Exclusion:
    sop_instance_uid: str
    reason: str
    window: str | None = None  # left out of this window only; shown in the series' others


@dataclass(frozen=True)
class ChosenFrame:
    image: SourceImage
    frame_index: int
    label: str  # what the model reads on the tile: "S7 z=-12.5" / "F3"; nothing identifying
    slice_position_mm: float | None = None


@dataclass(frozen=True)
class SeriesPlan:
    """One output image: a mosaic of a volume's slices, or one single image."""

    series_instance_uid: str
    modality: str
    kind: str  # "volume" or "single" (one image: a frame, or a cine loop's frames as one mosaic)
    frames: tuple[ChosenFrame, ...]
    available: int  # slices or frames the series (its stack) had
    stack: str = ""  # "frame stack 2 of 3" when the series holds several (analysis.selection)


@dataclass(frozen=True)
class ImageBudget:
    max_images: int = 4
    tiles_per_mosaic: int = 16
    allow_burned_in_annotation: bool = False
    unlabelled_burned_in: Mapping[str, Policy] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_images < 1:
            raise ValueError(f'Argument "max_images" must be at least 1, got {self.max_images}')
        if self.tiles_per_mosaic < 1:
            raise ValueError(f'Argument "tiles_per_mosaic" must be at least 1, got {self.tiles_per_mosaic}')


def exclusion_reason(image: SourceImage, budget: ImageBudget) -> str | None:
    if image.sop_class_uid.startswith(NON_IMAGE_SOP_CLASS_PREFIXES) or not image.rows or not image.columns:
        return f"not an image (SOP class {image.sop_class_uid})"
    if "LOCALIZER" in image.image_type:
        return "localizer"
    if len(image.image_type) > 1 and image.image_type[1] == "SECONDARY":
        return "derived/secondary image"
    if image.burned_in_annotation == "YES":
        return None if budget.allow_burned_in_annotation else "BurnedInAnnotation YES (may show patient data)"
    policy = policy_for(
        image.modality, image.sop_class_uid, image.burned_in_annotation, budget.unlabelled_burned_in
    )
    if policy == "exclude":
        return (
            f"{risk_modality(image.modality, image.sop_class_uid)} without BurnedInAnnotation NO (may show "
            "patient data; imaging.unlabelled_burned_in)"
        )
    return None


def evenly(count: int, wanted: int) -> list[int]:
    """``wanted`` indices spread evenly over ``range(count)``, first and last included."""
    if count <= wanted:
        return list(range(count))
    return sorted({int(i) for i in np.rint(np.linspace(0, count - 1, wanted))})


def cine_grid(frames: int, long_edge_px: int, frame_px: int) -> tuple[int, int, int]:
    """(columns, rows, tile px) of the one mosaic a cine loop's ``frames`` are shown in: near
    square, within ``long_edge_px``, tiles never larger than the frame (``frame_px``, its long
    side)."""
    columns = math.ceil(math.sqrt(frames))
    rows = math.ceil(frames / columns)
    return columns, rows, max(16, min(long_edge_px // max(columns, rows), frame_px))


def _normal(orientation: Sequence[float]) -> tuple[float, float, float]:
    rx, ry, rz, cx, cy, cz = (float(v) for v in orientation)
    return ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx


def frame_positions(path: Path, frames: int) -> list[tuple[float | None, str]]:
    """Each frame's position along its slice normal and its stack, from an enhanced multi-frame
    header (PS3.3 C.7.6.16: Plane Position, Plane Orientation and Frame Content functional
    groups). The stack is the frame's Stack ID and orientation: frames of one stack share a
    normal, so their positions order them. Positions are None (one stack, frame order) when the
    header does not say."""
    unknown: list[tuple[float | None, str]] = [(None, "")] * frames
    try:
        ds = dcmread(path, stop_before_pixels=True)
        shared = ds.get("SharedFunctionalGroupsSequence")
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        if not per_frame or len(per_frame) != frames:
            return unknown

        def orientation(group: Any) -> Any:
            sequence = group.get("PlaneOrientationSequence") if group is not None else None
            return sequence[0].ImageOrientationPatient if sequence else None

        def stack_id(group: Any) -> str:
            sequence = group.get("FrameContentSequence") if group is not None else None
            return str(sequence[0].get("StackID", "") or "").strip() if sequence else ""

        shared_group = shared[0] if shared else None
        shared_orientation = orientation(shared_group)
        placed: list[tuple[float | None, str]] = []
        for item in per_frame:
            own = orientation(item) or shared_orientation
            plane = item.get("PlanePositionSequence")
            if own is None or not plane:
                return unknown
            normal = _normal(own)
            nx, ny, nz = normal
            px, py, pz = (float(v) for v in plane[0].ImagePositionPatient)
            direction = ",".join(f"{v:.3f}" for v in normal)
            placed.append(
                (nx * px + ny * py + nz * pz, f"{stack_id(item) or stack_id(shared_group)}|{direction}")
            )
        return placed
    except Exception:  # an unreadable header: frame order it is
        return unknown


def _normal_key(image: SourceImage) -> str:
    if image.orientation is None:
        return ""
    rx, ry, rz, cx, cy, cz = image.orientation
    return ",".join(f"{v:.3f}" for v in (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx))


def _split_repeats(frames: list[ChosenFrame]) -> list[list[ChosenFrame]]:
    """Frames of one stack (in acquisition order) split where positions repeat: the k-th frame
    at a position goes to the k-th stack (a second acquisition, a time point, an echo), so no
    slab mixes them. One stack when no position repeats (or none is known); a few repeats (fewer
    than a volume's slices: a slice sent twice) stay in the first stack, in the slab of their
    position, rather than cost mosaics of their own."""
    seen: dict[float, int] = {}
    stacks: list[list[ChosenFrame]] = []
    for frame in frames:
        if frame.slice_position_mm is None:
            return [frames]
        key = round(frame.slice_position_mm, 3)
        k = seen.get(key, 0)
        seen[key] = k + 1
        while len(stacks) <= k:
            stacks.append([])
        stacks[k].append(frame)
    kept = [stacks[0]] + [stack for stack in stacks[1:] if len(stack) >= MIN_VOLUME_SLICES]
    kept[0] += [frame for stack in stacks[1:] if len(stack) < MIN_VOLUME_SLICES for frame in stack]
    return kept


def _volume_frames(images: list[SourceImage]) -> list[list[ChosenFrame]]:
    """A volume's frame stacks, each in position order with each frame labelled with its
    position: frames (or slices) are grouped by Stack ID and orientation, then split where a
    position repeats, so a slab never mixes two acquisitions of the same place."""
    groups: dict[str, list[ChosenFrame]] = {}
    for image in sorted(images, key=lambda im: (im.instance_number or 0, im.sop_instance_uid)):
        if image.number_of_frames > 1:  # enhanced / multi-frame: its frames by their groups
            for i, (z, key) in enumerate(frame_positions(image.path, image.number_of_frames)):
                label = f"F{i + 1}" + (f" z={z:.1f}" if z is not None else "")
                groups.setdefault(key, []).append(ChosenFrame(image, i, label, z))
        else:
            z = image.along_normal()
            label = f"z={z:.1f}" if z is not None else ""
            groups.setdefault(f"|{_normal_key(image)}", []).append(ChosenFrame(image, 0, label, z))
    stacks = [part for group in groups.values() for part in _split_repeats(group)]
    for stack in stacks:
        if all(f.slice_position_mm is not None for f in stack):
            stack.sort(key=lambda f: (f.slice_position_mm, f.image.instance_number or 0, f.frame_index))
    return stacks


def _is_volume(modality: str, images: list[SourceImage]) -> bool:
    if modality not in VOLUME_MODALITIES:
        return False
    if all(im.number_of_frames > 1 for im in images):  # multi-frame files: their frames
        return sum(im.number_of_frames for im in images) >= MIN_VOLUME_SLICES
    return len(images) >= MIN_VOLUME_SLICES and all(im.along_normal() is not None for im in images)


def plan_study(images: list[SourceImage], budget: ImageBudget) -> tuple[list[SeriesPlan], list[Exclusion]]:
    """What could be shown: one plan per volume (every slice, by position) and one per other
    image (its middle frame), volumes largest first; and why everything else is left out. How
    much of it the cost budget shows is :func:`analysis.budget.allocate`'s."""
    exclusions: list[Exclusion] = []
    by_series: dict[str, list[SourceImage]] = defaultdict(list)
    alone: list[SourceImage] = []
    for image in images:
        reason = exclusion_reason(image, budget)
        if reason is not None:
            exclusions.append(Exclusion(image.sop_instance_uid, reason))
        elif at_risk(image.modality, image.sop_class_uid):
            alone.append(image)  # shown alone, where its burned-in text is masked (analysis.prepare._mask)
        else:
            by_series[image.series_instance_uid].append(image)

    volumes: list[tuple[str, list[SourceImage]]] = []
    singles: list[SourceImage] = sorted(
        alone, key=lambda im: (im.series_instance_uid, im.instance_number or 0)
    )
    for series, members in by_series.items():
        modality = members[0].modality
        if _is_volume(modality, members):
            volumes.append((series, members))
        else:
            singles.extend(sorted(members, key=lambda im: (im.series_instance_uid, im.instance_number or 0)))
    volumes.sort(key=lambda item: -sum(im.number_of_frames for im in item[1]))

    plans: list[SeriesPlan] = []
    for series, members in volumes:
        stacks = _volume_frames(members)
        for n, frames in enumerate(stacks, start=1):
            stack = f"frame stack {n} of {len(stacks)}" if len(stacks) > 1 else ""
            plans.append(SeriesPlan(series, members[0].modality, "volume", tuple(frames), len(frames), stack))
    for image in singles:
        if image.number_of_frames > 1:  # a cine loop: frames spread over it
            picked = evenly(image.number_of_frames, CINE_FRAMES)
            shown = tuple(ChosenFrame(image, i, f"F{i + 1}") for i in picked)
        else:
            shown = (ChosenFrame(image, 0, "I1"),)
        plans.append(
            SeriesPlan(image.series_instance_uid, image.modality, "single", shown, image.number_of_frames)
        )
    return plans, exclusions
