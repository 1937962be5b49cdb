"""How much of a study the budget shows: slab thickness, mosaics per series and window, and what is
left out with the reason.

The budget is in image tokens (the provider's own formula: cost, not image count) and in images
per request (the provider's limit). Volumes are partitioned into slabs (:mod:`analysis.slabs`)
of the thinnest thickness the budget affords, never thicker than ``imaging.max_slab_mm``: a series
too long for the budget at that thickness gets more mosaics, not thicker slabs. When even that is
over the budget, the windows that matter most are kept (each series' first window before any
second window), the rest is left out and every slice it would have shown is listed in the
exclusions with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from analysis.layout import MosaicLayout
from analysis.selection import Exclusion, SeriesPlan, cine_grid
from analysis.slabs import Slab, max_slices, partition
from analysis.vision.tokens import IMAGE_TOKEN_FORMULAS
from analysis.windows import WindowSpec

FRAMES_PER_SLAB_WITHOUT_POSITIONS = 8  # a multi-frame stack with no per-frame positions


@dataclass(frozen=True)
class ImagePlan:
    """One image the model gets: a mosaic of one series' slabs in one window, or one image."""

    series: SeriesPlan
    kind: Literal["mosaic", "single"]
    tokens: int
    window: WindowSpec | None = None
    slabs: tuple[Slab, ...] = ()
    part: int = 1  # this is mosaic ``part`` of ``parts`` of the series in this window
    parts: int = 1

    @property
    def series_instance_uid(self) -> str:
        return self.series.series_instance_uid

    @property
    def modality(self) -> str:
        return self.series.modality


@dataclass(frozen=True)
class VolumeRequest:
    plan: SeriesPlan
    windows: tuple[WindowSpec, ...]


@dataclass(frozen=True)
class Allocation:
    images: list[ImagePlan]
    exclusions: list[Exclusion]
    thickness_mm: float | None  # the slab thickness asked of every volume (None: no volume)
    tokens: int
    layout: MosaicLayout | None


def _chunks(count: int, size: int) -> list[int]:
    """``count`` tiles in ceil(count/size) mosaics of nearly equal size (no near-empty last one)."""
    parts = math.ceil(count / size)
    base, extra = divmod(count, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def single_tokens(plan: SeriesPlan, formula: str, long_edge_px: int) -> int:
    """Image tokens of one image: a frame within ``long_edge_px``, or a cine loop's frames in
    their mosaic (:func:`analysis.selection.cine_grid`)."""
    image = plan.frames[0].image
    rows, columns = image.rows or long_edge_px, image.columns or long_edge_px
    if len(plan.frames) > 1:
        grid_columns, grid_rows, tile = cine_grid(len(plan.frames), long_edge_px, max(rows, columns))
        return IMAGE_TOKEN_FORMULAS[formula](grid_columns * tile, grid_rows * tile)
    scale = min(1.0, long_edge_px / max(rows, columns))
    return IMAGE_TOKEN_FORMULAS[formula](max(1, round(columns * scale)), max(1, round(rows * scale)))


def _slabs(plan: SeriesPlan, thickness_mm: float, max_slab_mm: float) -> list[Slab]:
    per_slab = max(1, math.ceil(FRAMES_PER_SLAB_WITHOUT_POSITIONS * thickness_mm / max_slab_mm))
    image = plan.frames[0].image
    return partition(plan.frames, thickness_mm, per_slab, max_slices(image.rows, image.columns))


def _volume_images(
    volumes: list[VolumeRequest], thickness_mm: float, max_slab_mm: float, layout: MosaicLayout
) -> list[tuple[int, ImagePlan]]:
    """Every mosaic at this thickness, with its priority (the window's rank in its series)."""
    out: list[tuple[int, ImagePlan]] = []
    for volume in volumes:
        slabs = _slabs(volume.plan, thickness_mm, max_slab_mm)
        for rank, window in enumerate(volume.windows):
            sizes = _chunks(len(slabs), layout.tiles)
            start = 0
            for part, size in enumerate(sizes, start=1):
                chunk = tuple(slabs[start : start + size])
                start += size
                image = ImagePlan(
                    volume.plan, "mosaic", layout.tokens_for(size), window, chunk, part, len(sizes)
                )
                out.append((rank, image))
    return out


def candidate_thicknesses(volumes: list[VolumeRequest], max_slab_mm: float) -> list[float]:
    """Thicknesses worth trying, thinnest first: whole numbers of each series' slice spacing."""
    values = {max_slab_mm}
    for volume in volumes:
        slabs = partition(volume.plan.frames, max_slab_mm)
        spacing = slabs[0].spacing_mm if slabs else None
        if spacing:
            values.update(k * spacing for k in range(1, int(max_slab_mm / spacing + 1e-9) + 1))
        else:
            values.update(
                max_slab_mm * k / FRAMES_PER_SLAB_WITHOUT_POSITIONS
                for k in range(1, FRAMES_PER_SLAB_WITHOUT_POSITIONS + 1)
            )
    return sorted(v for v in values if 0 < v <= max_slab_mm + 1e-9)


def over_budget_reason(
    images: int, tokens: int, max_images: int, max_tokens: int | None, slab_mm: float
) -> str:
    """Why part of a study is left out, naming the limit that binds: the images one request may
    carry (ainode sends one request per study, so this is the study's too) or the image tokens
    the study's budget buys."""
    limits = []
    if images > max_images:
        limits.append(
            f"{max_images} image{'s' if max_images != 1 else ''} in its one request "
            "(imaging.max_images and the provider's limit per request)"
        )
    if max_tokens is not None and tokens > max_tokens:
        limits.append(f"{max_tokens} image tokens (imaging.max_image_tokens, vision.max_cost_usd_per_study)")
    return (
        f"over the study's budget of {' and '.join(limits) or 'images and tokens'}: "
        f"it needs {images} images and {tokens} image tokens at {slab_mm:g} mm slabs"
    )


def allocate(
    volumes: list[VolumeRequest],
    singles: list[SeriesPlan],
    layout: MosaicLayout | None,
    *,
    max_images: int,
    max_tokens: int | None,
    max_slab_mm: float,
    formula: str,
    long_edge_px: int,
) -> Allocation:
    """Choose the thinnest slabs (at most ``max_slab_mm``) at which the whole study fits
    ``max_images`` and ``max_tokens`` (None: no token limit); when nothing fits, ``max_slab_mm``
    and the most important mosaics first, the rest excluded with the reason."""
    if max_images < 1:
        raise ValueError(f'Argument "max_images" must be at least 1, got {max_images}')
    if not max_slab_mm > 0:
        raise ValueError(f'Argument "max_slab_mm" must be positive, got {max_slab_mm}')
    if volumes and layout is None:
        raise ValueError('Argument "layout" is needed when there are volumes')
    single_images = [ImagePlan(s, "single", single_tokens(s, formula, long_edge_px)) for s in singles]
    limit = math.inf if max_tokens is None else max_tokens

    def fits(images: list[ImagePlan]) -> bool:
        return len(images) <= max_images and sum(i.tokens for i in images) <= limit

    thickness: float | None = None
    ranked: list[tuple[int, ImagePlan]] = []
    if volumes and layout is not None:
        for candidate in candidate_thicknesses(volumes, max_slab_mm):
            ranked = _volume_images(volumes, candidate, max_slab_mm, layout)
            thickness = candidate
            if fits([image for _, image in ranked] + single_images):
                return Allocation(
                    [image for _, image in ranked] + single_images,
                    [],
                    thickness,
                    sum(image.tokens for _, image in ranked) + sum(i.tokens for i in single_images),
                    layout,
                )
    # Over the budget even at the thickest slabs: the first window of every series, then the
    # second ..., then single images, each while it fits; the rest is listed, slice by slice.
    needed = sum(image.tokens for _, image in ranked) + sum(i.tokens for i in single_images)
    reason = over_budget_reason(
        len(ranked) + len(single_images), needed, max_images, max_tokens, thickness or max_slab_mm
    )
    accepted: set[int] = set()
    used_images, used_tokens = 0, 0
    exhausted = False
    order = sorted(range(len(ranked)), key=lambda i: ranked[i][0])  # stable: series, then part
    for i in order:
        image = ranked[i][1]
        if not exhausted and used_images + 1 <= max_images and used_tokens + image.tokens <= limit:
            accepted.add(i)
            used_images += 1
            used_tokens += image.tokens
        else:
            exhausted = True  # never a later slab shown where an earlier one was not
    exclusions: list[Exclusion] = []
    for i, (rank, image) in enumerate(ranked):
        if i in accepted:
            continue
        window = image.window.name if rank > 0 and image.window is not None else None
        for slab in image.slabs:
            for member in slab.members:
                exclusions.append(Exclusion(member.image.sop_instance_uid, reason, window))
    kept_singles: list[ImagePlan] = []
    for single in single_images:
        if used_images + 1 <= max_images and used_tokens + single.tokens <= limit:
            kept_singles.append(single)
            used_images += 1
            used_tokens += single.tokens
        else:
            exclusions.append(Exclusion(single.series.frames[0].image.sop_instance_uid, reason))
    kept = [image for i, (_, image) in enumerate(ranked) if i in accepted]
    # Renumber the parts: "mosaic 2 of 3" counts what is shown.
    renumbered: list[ImagePlan] = []
    for image in kept:
        siblings = [k for k in kept if k.series is image.series and k.window == image.window]
        renumbered.append(
            ImagePlan(
                image.series,
                image.kind,
                image.tokens,
                image.window,
                image.slabs,
                siblings.index(image) + 1,
                len(siblings),
            )
        )
    return Allocation(renumbered + kept_singles, exclusions, thickness, used_tokens, layout)
