"""From a box on an image the model saw to a region on the source image a radiologist reads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from analysis.findings import Box, Finding, Findings
from analysis.mosaic import ComposedImage
from analysis.volume import locate


@dataclass(frozen=True)
class SourceRegion:
    """A rectangle in source pixel coordinates (column, row) of one frame of one instance."""

    sop_instance_uid: str
    frame_index: int
    column_min: float
    row_min: float
    column_max: float
    row_max: float
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) in mm

    def corners(self) -> list[tuple[float, float]]:
        """A closed polyline (first point repeated), as TID 1500 POLYLINE regions want."""
        c0, r0, c1, r1 = self.column_min, self.row_min, self.column_max, self.row_max
        return [(c0, r0), (c1, r0), (c1, r1), (c0, r1), (c0, r0)]

    def long_axis_mm(self) -> float | None:
        if self.pixel_spacing is None:
            return None
        rows_mm = (self.row_max - self.row_min) * self.pixel_spacing[0]
        columns_mm = (self.column_max - self.column_min) * self.pixel_spacing[1]
        return max(rows_mm, columns_mm)


def map_box_to_source(box: Box, image: ComposedImage) -> SourceRegion | None:
    """The tile under the box's centre, the box clipped to that tile, in source pixels; None
    when the centre falls on no tile (a gap of the mosaic). On a slab tile, the region is on the
    slice the projected value inside the box came from (:func:`analysis.volume.locate`: for a
    MIP, the slice of the brightest voxel in the box)."""
    x0, y0 = box.x_min * image.width, box.y_min * image.height
    x1, y1 = box.x_max * image.width, box.y_max * image.height
    found = image.to_source((x0 + x1) / 2, (y0 + y1) / 2)
    if found is None:
        return None
    tile = found[0]
    cx0, cy0 = max(x0, tile.x0), max(y0, tile.y0)
    cx1, cy1 = min(x1, tile.x0 + tile.width), min(y1, tile.y0 + tile.height)
    (c0, r0), (c1, r1) = tile.to_source(cx0, cy0), tile.to_source(cx1, cy1)
    limit_c, limit_r = tile.source_columns, tile.source_rows
    c0, r0, c1, r1 = max(0.0, c0), max(0.0, r0), min(float(limit_c), c1), min(float(limit_r), r1)
    sop_instance_uid, frame_index = tile.sop_instance_uid, tile.frame_index
    if tile.slab is not None:
        source = locate(tile.slab.members, tile.slab.projection, tile.slab.window, (c0, r0, c1, r1))
        sop_instance_uid, frame_index = source.image.sop_instance_uid, source.frame_index
    return SourceRegion(sop_instance_uid, frame_index, c0, r0, c1, r1, tile.pixel_spacing)


@dataclass(frozen=True)
class PlacedFinding:
    """A finding the model asserts present or is unsure of (never a pertinent negative), with
    where it lies on a source image when the model gave a box that could be placed."""

    index: int  # its position in the model's list of findings (0-based)
    number: int  # 1-based among the findings not absent: the number the summary image shows
    finding: Finding
    region: SourceRegion | None


def place_findings(findings: Findings, composed: Sequence[ComposedImage]) -> list[PlacedFinding]:
    """Every finding not absent, numbered as the summary image numbers them, each with its region
    on the source image (None without a box, or a box that names no image or falls between tiles)."""
    placed: list[PlacedFinding] = []
    for index, finding in enumerate(findings.findings):
        if finding.absent:
            continue
        region = None
        if (
            finding.box is not None
            and finding.image_index is not None
            and finding.image_index <= len(composed)
        ):
            region = map_box_to_source(finding.box, composed[finding.image_index - 1])
        placed.append(PlacedFinding(index, len(placed) + 1, finding, region))
    return placed
