"""Mosaic layout from the provider's cost and rescaling: the tile size and grid that show the
most tiles per image token while a finding of ``min_finding_mm`` stays ``min_finding_px`` pixels
across in the image *as the provider processes it* (OpenAI shrinks the short side to 768 px,
Claude past 1568 px or 1.2 megapixels). Too small a tile would save tokens by hiding what the
study is read for, so a long series gets more mosaics, never smaller tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from analysis.vision.tokens import IMAGE_TOKEN_FORMULAS, PROCESSED_SCALE

TILE_STEP_PX = 16


@dataclass(frozen=True)
class MosaicLayout:
    columns: int
    rows: int
    tile_px: int
    formula: str

    @property
    def tiles(self) -> int:
        return self.columns * self.rows

    def grid_for(self, count: int) -> tuple[int, int]:
        """(columns, rows) of a mosaic holding ``count`` tiles: the layout's rows kept (the short
        side the provider rescales by), fewer columns."""
        if not 1 <= count <= self.tiles:
            raise ValueError(f'Argument "count" must be 1 to {self.tiles}, got {count}')
        rows = min(self.rows, count)
        return math.ceil(count / rows), rows

    def tokens_for(self, count: int) -> int:
        """Image tokens of a mosaic of ``count`` tiles, by the provider's formula."""
        columns, rows = self.grid_for(count)
        return IMAGE_TOKEN_FORMULAS[self.formula](columns * self.tile_px, rows * self.tile_px)


def needed_tile_px(
    field_of_view_mm: float | None, min_finding_mm: float, min_finding_px: float
) -> float | None:
    """Processed pixels a tile needs so a ``min_finding_mm`` finding is ``min_finding_px`` across."""
    if field_of_view_mm is None or field_of_view_mm <= 0:
        return None
    return field_of_view_mm * min_finding_px / min_finding_mm


def choose_layout(
    formula: str,
    needed_px: float | None,
    default_tile_px: int,
    max_long_edge_px: int,
    max_grid: int,
    source_px: int,
) -> MosaicLayout:
    """The layout with the fewest image tokens per tile among those whose tiles keep
    ``needed_px`` after the provider's rescaling (``needed_px`` None: tiles of
    ``default_tile_px``). Ties go to more tiles per image (fewer images), then to larger tiles:
    OpenAI's 512 px token tiles price 224, 240 and 256 px tiles of an 8 x 3 mosaic alike, and
    the larger shows a finding in more pixels for the same cost."""
    if formula not in IMAGE_TOKEN_FORMULAS:
        raise ValueError(f'Argument "formula" must be one of {sorted(IMAGE_TOKEN_FORMULAS)}, got "{formula}"')
    if max_long_edge_px < 16 or max_grid < 1:
        raise ValueError(f"max_long_edge_px {max_long_edge_px} and max_grid {max_grid} must be positive")
    tokens, scale = IMAGE_TOKEN_FORMULAS[formula], PROCESSED_SCALE[formula]
    if needed_px is None:
        sizes = [min(default_tile_px, max_long_edge_px)]
    else:
        # From the size needed up to the source's own (a bigger tile shows nothing more).
        smallest = max(TILE_STEP_PX, math.ceil(needed_px / TILE_STEP_PX) * TILE_STEP_PX)
        largest = max(smallest, min(max_long_edge_px, max(source_px, smallest)))
        sizes = list(range(smallest, largest + 1, TILE_STEP_PX))
    # Plain tuples in the loop (a few thousand layouts): a layout is made only for the answer.
    best: tuple[float, int, int, int, int] | None = None  # per-tile tokens, -tiles, tile, columns, rows
    fallback: tuple[float, int, int, int] | None = None  # shown, tile, columns, rows
    for tile in sizes:
        for rows in range(1, max_grid + 1):
            height = rows * tile
            if height > max_long_edge_px:
                break
            for columns in range(1, max_grid + 1):
                width = columns * tile
                if width > max_long_edge_px:
                    break
                shown = tile * scale(width, height)
                if needed_px is not None and shown + 1e-9 < needed_px:
                    if fallback is None or shown > fallback[0]:
                        fallback = (shown, tile, columns, rows)
                    continue
                candidate = (tokens(width, height) / (columns * rows), -(columns * rows), tile, columns, rows)
                if best is None or candidate[:2] < best[:2] or (candidate[:2] == best[:2] and tile > best[2]):
                    best = candidate
    if best is not None:
        return MosaicLayout(best[3], best[4], best[2], formula)
    if fallback is not None:  # the provider cannot show a tile that large: the largest it can
        return MosaicLayout(fallback[2], fallback[3], fallback[1], formula)
    size = min(default_tile_px, max_long_edge_px)
    return MosaicLayout(1, 1, size, formula)
