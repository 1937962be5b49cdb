"""Slabs: a volume partitioned along its slice normal, so that every slice is shown in exactly one
tile and nothing falls between the slices shown.

Slices are ordered by position along the normal (never by Instance Number, which scanners number
either way or restart); a slab is the slices whose positions fall in one interval of the chosen
thickness, so a gap in the series leaves its interval empty instead of making a slab that spans
the gap thicker than it says.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from analysis.selection import ChosenFrame

MAX_SLICES_PER_SLAB = 255  # a slab's "which slice" map is one byte per pixel
MAX_SLAB_BYTES = 512 * 1024 * 1024  # a slab is read into memory whole: this much at most


def max_slices(rows: int | None, columns: int | None) -> int:
    """Slices a slab of frames this size may hold: :data:`MAX_SLICES_PER_SLAB`, fewer when they
    would take more than :data:`MAX_SLAB_BYTES` as float32 values (a 4096 x 4096 series at
    0.1 mm spacing would otherwise read 255 slices of 64 MiB into one slab)."""
    frame = max(rows or 1, 1) * max(columns or 1, 1) * 4
    return max(1, min(MAX_SLICES_PER_SLAB, MAX_SLAB_BYTES // frame))


@dataclass(frozen=True)
class Slab:
    """Consecutive slices of one series, by position; ``members`` in position order."""

    members: tuple[ChosenFrame, ...]
    spacing_mm: float | None  # the series' slice spacing (median step), None without positions

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError('Argument "members" must not be empty')

    @property
    def first(self) -> ChosenFrame:
        return self.members[0]

    @property
    def last(self) -> ChosenFrame:
        return self.members[-1]

    @property
    def middle(self) -> ChosenFrame:
        return self.members[(len(self.members) - 1) // 2]

    @property
    def thickness_mm(self) -> float | None:
        """The thickness the slab covers: first to last centre plus one slice spacing."""
        first, last = self.first.slice_position_mm, self.last.slice_position_mm
        if first is None or last is None or self.spacing_mm is None:
            return None
        return abs(last - first) + self.spacing_mm


def slice_spacing(positions: Sequence[float]) -> float | None:
    """The median step between distinct sorted positions (None for fewer than two)."""
    distinct = sorted(set(positions))
    steps = sorted(b - a for a, b in itertools.pairwise(distinct))
    if not steps:
        return None
    return steps[len(steps) // 2]


def partition(
    frames: Sequence[ChosenFrame],
    thickness_mm: float,
    frames_per_slab: int = 8,
    most: int = MAX_SLICES_PER_SLAB,
) -> list[Slab]:
    """Partition ``frames`` (one series, any order) into slabs at most ``thickness_mm`` thick.

    With positions: slabs are the intervals ``[z0 - s/2 + k*t, z0 - s/2 + (k+1)*t)`` of the slice
    centres (``s`` the slice spacing), so each covers at most ``t`` mm. Without positions (a
    multi-frame without per-frame positions): ``frames_per_slab`` consecutive frames. No slab
    holds more than ``most`` slices: an interval with more is cut in consecutive runs.
    """
    if not thickness_mm > 0:
        raise ValueError(f'Argument "thickness_mm" must be positive, got {thickness_mm}')
    if most < 1:
        raise ValueError(f'Argument "most" must be at least 1, got {most}')
    if frames_per_slab < 1:
        raise ValueError(f'Argument "frames_per_slab" must be at least 1, got {frames_per_slab}')
    if not frames:
        return []
    positions = [f.slice_position_mm for f in frames]
    if None in positions:
        ordered = sorted(
            frames, key=lambda f: (f.image.instance_number or 0, f.image.sop_instance_uid, f.frame_index)
        )
        size = min(frames_per_slab, most)
        return [Slab(tuple(ordered[i : i + size]), None) for i in range(0, len(ordered), size)]
    ordered = sorted(frames, key=lambda f: (f.slice_position_mm, f.image.instance_number or 0, f.frame_index))
    zs = [f.slice_position_mm or 0.0 for f in ordered]
    spacing = slice_spacing(zs)
    step = spacing or thickness_mm
    start = zs[0] - step / 2
    # A whole number of slice spacings (so a slab's n slices cover n * s <= t mm), and never less
    # than one slice per slab, however thin the request.
    width = max(math.floor(thickness_mm / step + 1e-9), 1) * step
    floor = math.floor
    # A hair of tolerance: positions written as decimal strings are not exact multiples.
    # Positions are sorted, so each interval's slices are one run.
    indices = [floor((z - start) / width + 1e-6) for z in zs]
    slabs: list[Slab] = []
    begin = 0
    for end in range(1, len(ordered) + 1):
        if end == len(ordered) or indices[end] != indices[begin]:
            for i in range(begin, end, most):
                slabs.append(Slab(tuple(ordered[i : min(i + most, end)]), spacing))
            begin = end
    return slabs
