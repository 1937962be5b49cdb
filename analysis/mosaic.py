"""Compose what the model sees: labelled mosaics of slabs (or slices), or one image resized, with
the exact mapping from every output pixel back to its source image, frame and pixel (for boxes).
A slab tile keeps its slices, so a box on it maps to the slice the finding is on
(:func:`analysis.regions.map_box_to_source`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

from analysis.imaging import DisplayFrame, WindowChoice
from analysis.selection import ChosenFrame
from analysis.windows import PROJECTION_WORDS, WindowSpec


@dataclass(frozen=True)
class SlabTile:
    """What one slab tile shows: its slices (in position order), projection and window."""

    members: tuple[ChosenFrame, ...]
    thickness_mm: float | None
    projection: str  # "mip", "average", "minip"
    window: WindowSpec

    @property
    def first_position_mm(self) -> float | None:
        return self.members[0].slice_position_mm

    @property
    def last_position_mm(self) -> float | None:
        return self.members[-1].slice_position_mm

    def position_words(self) -> str:
        """Where the slab is, as the prompt and the manifest say it."""
        if self.first_position_mm is not None and self.last_position_mm is not None:
            return f"{self.first_position_mm:.1f} to {self.last_position_mm:.1f} mm"
        return f"frames {self.members[0].frame_index + 1} to {self.members[-1].frame_index + 1}"

    def words(self) -> str:
        """The slab as the prompt and the manifest say it."""
        thickness = f"{self.thickness_mm:.1f} mm" if self.thickness_mm is not None else "frame"
        return (
            f"{thickness} slab of {len(self.members)} slice(s), "
            f"{PROJECTION_WORDS.get(self.projection, self.projection)}, {self.window.words}, "
            f"slice centres {self.position_words()} along the slice normal"
        )


@dataclass(frozen=True)
class Tile:
    """Where one source frame sits in an output image: output = source * scale + (x0, y0)."""

    sop_instance_uid: str
    series_instance_uid: str
    frame_index: int
    label: str
    window: WindowChoice
    source_rows: int
    source_columns: int
    x0: int
    y0: int
    width: int
    height: int
    scale: float  # output pixels per source pixel
    pixel_spacing: tuple[float, float] | None
    slab: SlabTile | None = None  # a slab tile: the slices behind it (sop_instance_uid: the middle)

    @property
    def source_instances(self) -> tuple[str, ...]:
        """Every instance this tile shows (a slab's slices, or its one image)."""
        if self.slab is None:
            return (self.sop_instance_uid,)
        return tuple(dict.fromkeys(m.image.sop_instance_uid for m in self.slab.members))

    def contains(self, x: float, y: float) -> bool:
        return self.x0 <= x < self.x0 + self.width and self.y0 <= y < self.y0 + self.height

    def to_source(self, x: float, y: float) -> tuple[float, float]:
        """An output pixel (column x, row y) to the source frame's (column, row)."""
        return (x - self.x0) / self.scale, (y - self.y0) / self.scale


@dataclass(frozen=True)
class ComposedImage:
    pixels: NDArray[np.uint8]
    tiles: tuple[Tile, ...]
    description: str

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    def to_source(self, x: float, y: float) -> tuple[Tile, float, float] | None:
        """Which tile an output pixel falls in, and where in its source frame."""
        for tile in self.tiles:
            if tile.contains(x, y):
                return tile, *tile.to_source(x, y)
        return None


def _resized_image(pixels: NDArray[np.uint8], scale: float) -> Image.Image:
    """``pixels`` scaled by ``scale``: a box filter down (by a whole factor, Pillow's ``reduce``,
    the same box average in a quarter of the time), bicubic up."""
    height, width = pixels.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(pixels)
    if size == (width, height):
        return image
    factor = round(1 / scale) if scale < 1 else 1
    if factor > 1 and width == size[0] * factor and height == size[1] * factor:
        return image.reduce(factor)
    return image.resize(size, Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC)


def _resized(pixels: NDArray[np.uint8], scale: float) -> NDArray[np.uint8]:
    height, width = pixels.shape[:2]
    if (max(1, round(width * scale)), max(1, round(height * scale))) == (width, height):
        return pixels
    return np.asarray(_resized_image(pixels, scale))


@functools.lru_cache(maxsize=1)
def _label_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default()


@functools.lru_cache(maxsize=4096)
def _label_ink(text: str) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The label's ink (alpha, drawn at the origin) and its text box, rendered once: a slab's
    label is the same in every window, and FreeType costs more per label than the rest of a tile."""
    font = _label_font()
    left, top, right, bottom = (
        int(v) for v in ImageDraw.Draw(Image.new("L", (1, 1))).textbbox((0, 0), text, font=font)
    )
    ink = Image.new("L", (max(right, 1), max(bottom, 1)))
    ImageDraw.Draw(ink).text((0, 0), text, fill=255, font=font)
    return ink, (left, top, right, bottom)


def _put_label(canvas: Image.Image, text: str, x: int, y: int) -> None:
    """A black box under the text (its box, both edges included, as ImageDraw.rectangle), then the
    text white (yellow on colour) through its ink, as ImageDraw.text draws it there."""
    ink, (left, top, right, bottom) = _label_ink(text)
    canvas.paste(0, (x + left, y + top, x + right + 1, y + bottom + 1))
    canvas.paste((255, 255, 0) if canvas.mode == "RGB" else 255, (x, y, x + ink.width, y + ink.height), ink)


@dataclass(frozen=True)
class CellImage:
    """A frame already scaled to fit a mosaic cell (:func:`fit_to_cell`): what a mosaic keeps of
    it, so the frame's full-size pixels can go as soon as it is rendered."""

    image: Image.Image  # the scaled frame, as it is pasted
    scale: float  # output pixels per source pixel
    source_rows: int
    source_columns: int
    frame_index: int
    window: WindowChoice
    pixel_spacing: tuple[float, float] | None


def fit_to_cell(frame: DisplayFrame, tile_px: int) -> CellImage:
    """``frame`` scaled to fit a ``tile_px`` cell, aspect kept (BOX down, bicubic up)."""
    if tile_px < 16:
        raise ValueError(f'Argument "tile_px" must be at least 16, got {tile_px}')
    height, width = frame.pixels.shape[:2]
    scale = min(tile_px / width, tile_px / height)
    return CellImage(
        _resized_image(frame.pixels, scale),
        scale,
        int(height),
        int(width),
        frame.frame_index,
        frame.window,
        frame.pixel_spacing,
    )


def _tile(
    chosen: ChosenFrame,
    frame: DisplayFrame | CellImage,
    x0: int,
    y0: int,
    shown: tuple[int, int],  # (height, width) placed
    scale: float,
    slab: SlabTile | None = None,
) -> Tile:
    if isinstance(frame, CellImage):
        rows, columns = frame.source_rows, frame.source_columns
    else:
        rows, columns = int(frame.pixels.shape[0]), int(frame.pixels.shape[1])
    return Tile(
        sop_instance_uid=chosen.image.sop_instance_uid,
        series_instance_uid=chosen.image.series_instance_uid,
        frame_index=frame.frame_index,
        label=chosen.label,
        window=frame.window,
        source_rows=rows,
        source_columns=columns,
        x0=x0,
        y0=y0,
        width=int(shown[1]),
        height=int(shown[0]),
        scale=scale,
        pixel_spacing=frame.pixel_spacing,
        slab=slab,
    )


def compose_mosaic(
    frames: Sequence[tuple[ChosenFrame, DisplayFrame | CellImage]],
    tile_px: int,
    description: str,
    columns: int | None = None,
    slabs: Sequence[SlabTile | None] | None = None,
) -> ComposedImage:
    """Tile frames row by row into a grid of ``tile_px`` cells (``columns`` wide, else near
    square), each frame scaled to fit its cell (aspect kept, centred; a :class:`CellImage` is
    already) and labelled in its top-left corner; ``slabs``: what each tile shows, when it is a
    slab."""
    if not frames:
        raise ValueError('Argument "frames" must not be empty')
    if tile_px < 16:
        raise ValueError(f'Argument "tile_px" must be at least 16, got {tile_px}')
    if slabs is not None and len(slabs) != len(frames):
        raise ValueError(f'Argument "slabs" must have one entry per frame ({len(frames)}), got {len(slabs)}')
    if columns is not None and columns < 1:
        raise ValueError(f'Argument "columns" must be at least 1, got {columns}')
    cells = [(chosen, f if isinstance(f, CellImage) else fit_to_cell(f, tile_px)) for chosen, f in frames]
    if any(max(cell.image.size) > tile_px for _, cell in cells):
        raise ValueError(f"a cell image is larger than the {tile_px} px cell")
    columns = min(columns or math.ceil(math.sqrt(len(cells))), len(cells))
    rows = math.ceil(len(cells) / columns)
    color = any(cell.image.mode == "RGB" for _, cell in cells)
    canvas = Image.new("RGB" if color else "L", (columns * tile_px, rows * tile_px))
    tiles: list[Tile] = []
    for index, (chosen, cell) in enumerate(cells):
        shown = cell.image  # pasted as it is: no copy through numpy
        cell_y, cell_x = divmod(index, columns)
        x0 = cell_x * tile_px + (tile_px - shown.width) // 2
        y0 = cell_y * tile_px + (tile_px - shown.height) // 2
        canvas.paste(shown.convert("RGB") if color and shown.mode != "RGB" else shown, (x0, y0))
        slab = slabs[index] if slabs is not None else None
        tiles.append(_tile(chosen, cell, x0, y0, (shown.height, shown.width), cell.scale, slab))
    for index, tile in enumerate(tiles):
        cell_y, cell_x = divmod(index, columns)
        _put_label(canvas, tile.label, cell_x * tile_px + 2, cell_y * tile_px + 2)
    pixels: NDArray[np.uint8] = np.asarray(canvas)  # read-only, as before
    return ComposedImage(pixels, tuple(tiles), description)


def compose_single(
    chosen: ChosenFrame, frame: DisplayFrame, long_edge_px: int, description: str
) -> ComposedImage:
    """One image, scaled down so its long edge is at most ``long_edge_px`` (never up)."""
    if long_edge_px < 16:
        raise ValueError(f'Argument "long_edge_px" must be at least 16, got {long_edge_px}')
    height, width = frame.pixels.shape[:2]
    scale = min(1.0, long_edge_px / max(height, width))
    shown = _resized(frame.pixels, scale)
    placed = (int(shown.shape[0]), int(shown.shape[1]))
    return ComposedImage(shown, (_tile(chosen, frame, 0, 0, placed, scale),), description)
