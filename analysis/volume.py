"""Slab projections of a volume, vectorised with numpy: each slab's slices are read once, put
through the modality LUT into one (slices, rows, columns) float32 array, and reduced along the
slice axis (maximum, mean or minimum) for every window the series is shown in.

And the way back: :func:`locate` finds, for a box on a slab tile, the slice the projected value
came from (for a MIP, the slice of the brightest voxel inside the box), so the SR's region lands
on the image where the finding is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

from analysis.errors import ImageSkipped
from analysis.imaging import MAX_SOURCE_PIXELS, DisplayFrame, WindowChoice, apply_window
from analysis.selection import ChosenFrame
from analysis.slabs import Slab
from analysis.windows import WindowSpec

Values = NDArray[np.float32]


def _rescale(ds: Dataset, frame_index: int) -> tuple[float, float] | None:
    """(slope, intercept) of the Modality LUT (PS3.3 C.11.1), from the top level or, in an enhanced
    multi-frame, the Pixel Value Transformation functional group (C.7.6.16.2.9); None when a
    Modality LUT Sequence has to be applied instead."""
    if ds.get("ModalityLUTSequence"):
        return None
    source: Dataset = ds
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame_index),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        sequence = ds.get(groups)
        if sequence and index < len(sequence):
            transformation = sequence[index].get("PixelValueTransformationSequence")
            if transformation:
                source = transformation[0]
                break
    try:
        return float(source.get("RescaleSlope", 1) or 1), float(source.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return 1.0, 0.0


class SliceReader:
    """Values (after the modality LUT) of the frames of a series, keeping the last multi-frame
    file decoded so a stack of its frames is decoded once."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._dataset: Dataset | None = None
        self._pixels: NDArray[np.generic] | None = None

    def header(self, frame: ChosenFrame) -> Dataset:
        self._load(frame.image.path)
        if self._dataset is None:
            raise ImageSkipped(f"cannot read {frame.image.sop_instance_uid}")
        return self._dataset

    def _load(self, path: Path) -> None:
        if self._path == path:
            return
        self._path, self._dataset, self._pixels = path, None, None
        ds = dcmread(path)
        rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        if rows * columns > MAX_SOURCE_PIXELS:
            raise ImageSkipped(f"frame of {rows}x{columns} pixels exceeds the limit; not decoded")
        self._dataset, self._pixels = ds, _native(ds, rows, columns)

    def values(self, frame: ChosenFrame) -> Values:
        try:
            self._load(frame.image.path)
        except ImageSkipped:
            raise
        except Exception as exc:
            raise ImageSkipped(f"cannot decode pixels ({type(exc).__name__}: {str(exc)[:200]})") from exc
        ds, pixels = self._dataset, self._pixels
        if ds is None or pixels is None:
            raise ImageSkipped(f"cannot read {frame.image.sop_instance_uid}")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        raw = pixels[frame.frame_index] if frames > 1 else pixels
        if raw.ndim != 2:
            raise ImageSkipped(f"frame {frame.frame_index} is not a grayscale image")
        rescale = _rescale(ds, frame.frame_index)
        if rescale is None:
            return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
        slope, intercept = rescale
        values = raw.astype(np.float32)
        if slope != 1.0:
            values *= np.float32(slope)
        if intercept != 0.0:
            values += np.float32(intercept)
        return values


_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _native(ds: Dataset, rows: int, columns: int) -> NDArray[np.generic]:
    """Pixels of an uncompressed little-endian single-frame grayscale image straight from its
    bytes (pydicom's general decoder costs more than the rest of a slab's work); anything else
    through pydicom. Unsigned values are masked to Bits Stored, as PS3.5 8.1.1 says to."""
    syntax = str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "") or "")
    allocated, stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    size = rows * columns * allocated // 8
    data = ds.get("PixelData")
    if (
        syntax in _NATIVE_LITTLE_ENDIAN
        and int(ds.get("SamplesPerPixel", 1) or 1) == 1
        and int(ds.get("NumberOfFrames", 1) or 1) == 1
        and allocated in (8, 16, 32)
        and 0 < stored <= allocated
        and (not signed or stored == allocated)
        and isinstance(data, bytes)
        and len(data) >= size
    ):
        dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
        pixels = np.frombuffer(data, dtype=dtype, count=rows * columns).reshape(rows, columns)
        if not signed and stored < allocated:
            pixels = pixels & dtype.type((1 << stored) - 1)
        return pixels
    array: NDArray[np.generic] = ds.pixel_array
    return array


def stack(slab: Slab, reader: SliceReader) -> tuple[Values, list[ChosenFrame], list[tuple[ChosenFrame, str]]]:
    """The slab's values as one (slices, rows, columns) array; slices that cannot be read or do
    not match the first one's size are returned apart with the reason."""
    arrays: list[Values] = []
    used: list[ChosenFrame] = []
    skipped: list[tuple[ChosenFrame, str]] = []
    for member in slab.members:
        try:
            values = reader.values(member)
        except ImageSkipped as exc:
            skipped.append((member, str(exc)))
            continue
        if arrays and values.shape != arrays[0].shape:
            skipped.append(
                (member, f"{values.shape[0]}x{values.shape[1]} pixels, unlike the rest of its slab")
            )
            continue
        arrays.append(values)
        used.append(member)
    if not arrays:
        return np.zeros((0, 0, 0), dtype=np.float32), used, skipped
    return np.stack(arrays), used, skipped


def project(values: Values, projection: str) -> Values:
    """One slab's projection along the slice axis (axis 0)."""
    if values.ndim != 3 or values.shape[0] == 0:
        raise ValueError(
            f'Argument "values" must be a non-empty (slices, rows, columns) array, got {values.shape}'
        )
    if projection == "mip":
        projected: Values = values.max(axis=0)
    elif projection == "minip":
        projected = values.min(axis=0)
    elif projection == "average":
        projected = values.mean(axis=0, dtype=np.float32)
    else:
        raise ValueError(f'Argument "projection" must be "mip", "average" or "minip", got "{projection}"')
    return projected


def render(
    values: Values,
    window: WindowSpec,
    monochrome1: bool,
    frame_index: int,
    spacing: tuple[float, float] | None,
) -> DisplayFrame:
    """A slab's projection in one window (or three, as RGB) to display pixels."""
    projected = project(values, window.projection)
    if window.rgb is not None:
        channels = [apply_window(projected, WindowChoice(c, w, "rgb channel")) for c, w in window.rgb]
        pixels = np.ascontiguousarray(np.stack(channels, axis=2))
    else:
        pixels = apply_window(projected, WindowChoice(window.center, window.width, window.explanation))
        if monochrome1:
            pixels = 255 - pixels
    return DisplayFrame(
        pixels, frame_index, WindowChoice(window.center, window.width, window.explanation), spacing
    )


def locate(
    members: Sequence[ChosenFrame],
    projection: str,
    window: WindowSpec,
    box: tuple[float, float, float, float],
) -> ChosenFrame:
    """The slice a box (column_min, row_min, column_max, row_max in source pixels) on a slab tile
    comes from: MIP, the slice of the brightest voxel in the box; MinIP, the darkest; average,
    the brightest voxel that is not far above the window (so the skull next to a subdural
    haematoma does not pull the region to another slice). Reads the slab's slices again: only
    for the few boxes a model draws, and the slab holds no copy of its voxels meanwhile."""
    if not members:
        raise ValueError('Argument "members" must not be empty')
    reader = SliceReader()
    c0, r0, c1, r1 = box
    column_min, row_min = max(int(np.floor(c0)), 0), max(int(np.floor(r0)), 0)
    column_max, row_max = max(int(np.ceil(c1)), column_min + 1), max(int(np.ceil(r1)), row_min + 1)
    crops: list[Values] = []
    kept: list[ChosenFrame] = []
    for member in members:
        try:
            values = reader.values(member)
        except ImageSkipped:
            continue
        crop = values[row_min:row_max, column_min:column_max]
        if crop.size == 0 or (crops and crop.shape != crops[0].shape):
            continue
        crops.append(crop)
        kept.append(member)
    if not crops:
        return members[(len(members) - 1) // 2]
    cube = np.stack(crops)
    if projection == "minip":
        flat = int(np.argmin(cube))
    elif projection == "mip" or window.rgb is not None:
        flat = int(np.argmax(cube))
    else:
        ceiling = window.center + window.width  # half a width past the window's top
        flat = int(np.argmax(np.where(cube <= ceiling, cube, -np.inf)))
    return kept[np.unravel_index(flat, cube.shape)[0]]
