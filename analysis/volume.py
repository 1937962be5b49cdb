"""Slab projections of a volume, vectorised with numpy: each slab's slices are read once into one
(slices, rows, columns) array (plain slices straight from their bytes into a buffer reused from
slab to slab, :mod:`analysis.native`; the rest through pydicom), kept as the stored integers
while the slab shares one linear Modality LUT, reduced along the slice axis (maximum, sum or
minimum) and windowed from the reduction (a table look-up for 8- and 16-bit values) for every
window the series is shown in. The pixels are those of windowing the values and projecting
them, as :func:`project` and :func:`analysis.imaging.apply_window` do.

And the way back: :func:`locate` finds, for a box on a slab tile, the slice the projected value
came from (for a MIP, the slice of the brightest voxel inside the box), so the SR's region lands
on the image where the finding is.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

from analysis.errors import ImageSkipped
from analysis.imaging import MAX_SOURCE_PIXELS, DisplayFrame, Gray8, WindowChoice, apply_window
from analysis.native import read_header, read_pixels
from analysis.selection import ChosenFrame
from analysis.slabs import Slab
from analysis.windows import WindowSpec

Values = NDArray[np.float32]
# Offered a slice's (rows, columns) and stored type, an array to read it into, or None.
Destination = Callable[[tuple[int, int], np.dtype[Any]], NDArray[Any] | None]


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


class Scratch:
    """Work arrays reused from one slab to the next, by name: fresh memory costs a page fault per
    4 KiB each time it is touched, as much as the arithmetic done in it. An array handed out
    is valid until the same name is asked for again."""

    def __init__(self) -> None:
        self._arrays: dict[str, NDArray[Any]] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype[Any] | type) -> NDArray[Any]:
        kept = self._arrays.get(name)
        if kept is None or kept.shape != shape or kept.dtype != np.dtype(dtype):
            kept = self._arrays[name] = np.empty(shape, dtype=dtype)
        return kept


class SliceReader:
    """Values (after the modality LUT) of the frames of a series. A plain uncompressed slice is
    read straight from its bytes (:mod:`analysis.native`); anything else through pydicom, keeping
    the last multi-frame file decoded so a stack of its frames is decoded once."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._dataset: Dataset | None = None
        self._pixels: NDArray[np.generic] | None = None
        self._buffer: NDArray[Any] | None = None
        self.scratch = Scratch()  # for the reductions and windows of the slabs it stacks

    def buffer(self, slices: int, shape: tuple[int, ...], dtype: np.dtype[Any]) -> NDArray[Any]:
        """A (slices, *shape) array of ``dtype`` to stack a slab in, the same memory from one slab
        to the next while it fits: fresh memory per slab costs a page fault per 4 KiB, as much
        as reading the slices."""
        kept = self._buffer
        if kept is None or kept.dtype != dtype or kept.shape[1:] != tuple(shape) or kept.shape[0] < slices:
            kept = self._buffer = np.empty((slices, *shape), dtype=dtype)
        return kept[:slices]

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

    def stored(
        self, frame: ChosenFrame, into: Destination | None = None
    ) -> tuple[NDArray[np.generic], float, float]:
        """The frame's stored values and the linear Modality LUT (slope, intercept) that makes
        them values; values already through a Modality LUT Sequence come with (1, 0). ``into``
        may offer an array to read a plain slice straight into (given its shape and type)."""
        try:
            if frame.image.number_of_frames == 1 and self._path != frame.image.path:
                descriptor = os.open(frame.image.path, os.O_RDONLY)
                try:
                    header = read_header(descriptor)
                    if header is not None:
                        rows, columns = header.rows, header.columns
                        if rows * columns > MAX_SOURCE_PIXELS:
                            raise ImageSkipped(
                                f"frame of {rows}x{columns} pixels exceeds the limit; not decoded"
                            )
                        out = into((rows, columns), header.dtype) if into else None
                        return read_pixels(descriptor, header, out), header.slope, header.intercept
                finally:
                    os.close(descriptor)
            self._load(frame.image.path)
        except ImageSkipped:
            raise
        except Exception as exc:
            raise ImageSkipped(f"cannot decode pixels ({type(exc).__name__}: {str(exc)[:200]})") from exc
        ds, pixels = self._dataset, self._pixels
        if ds is None or pixels is None:
            raise ImageSkipped(f"cannot read {frame.image.sop_instance_uid}")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1 and not 0 <= frame.frame_index < frames:
            raise ImageSkipped(f"frame {frame.frame_index} of {frames} frames does not exist")
        raw = pixels[frame.frame_index] if frames > 1 else pixels
        if raw.ndim != 2:
            raise ImageSkipped(f"frame {frame.frame_index} is not a grayscale image")
        rescale = _rescale(ds, frame.frame_index)
        if rescale is None:
            return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32), 1.0, 0.0
        return raw, *rescale

    def values(self, frame: ChosenFrame) -> Values:
        raw, slope, intercept = self.stored(frame)
        return _rescaled(raw, slope, intercept)


def _rescaled(raw: NDArray[np.generic], slope: float, intercept: float) -> Values:
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


@dataclass(frozen=True)
class SlabValues:
    """A slab's slices as one (slices, rows, columns) array: the stored values with one linear
    Modality LUT shared by every slice (the usual CT and MR series, kept as integers so the
    projections reduce half or a quarter of the bytes), or float32 values when the slices'
    rescales differ (PET) or a Modality LUT Sequence was applied (slope 1, intercept 0)."""

    stored: NDArray[np.generic]
    slope: float = 1.0
    intercept: float = 0.0
    scratch: Scratch | None = field(default=None, compare=False, repr=False)  # where reductions go
    _reductions: dict[str, NDArray[Any]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def slices(self) -> int:
        return int(self.stored.shape[0])

    def values(self) -> Values:
        """Every slice in values (float32): for tests and the rare caller that wants them all."""
        return _rescaled(self.stored, self.slope, self.intercept)

    def reduce(self, projection: str) -> tuple[NDArray[Any], float, float]:
        """The slab reduced along its slices, and the linear map (slope, intercept) from it to
        the projection's values. A linear rescale commutes with the mean, and with the maximum
        and minimum (swapped when the slope is negative), so the reduction runs on the stored
        integers: the maximum stays in their type, the mean is their sum with ``slope / slices``,
        summed in their own type when it cannot overflow (a quarter of the time of a float
        sum). Each reduction is made once per slab (in the reader's scratch arrays when the
        slab came from :func:`stack`: valid until it stacks the next slab)."""
        if self.stored.ndim != 3 or self.stored.shape[0] == 0:
            shape = self.stored.shape
            raise ValueError(
                f'Argument "values" must be a non-empty (slices, rows, columns) array, not {shape}'
            )
        if projection not in ("mip", "minip", "average"):
            raise ValueError(f'Argument "projection" must be "mip", "average" or "minip", got "{projection}"')
        if self.slope < 0 and projection in ("mip", "minip"):
            projection = "minip" if projection == "mip" else "mip"
        if projection == "mip":
            return self._reduction("max"), self.slope, self.intercept
        if projection == "minip":
            return self._reduction("min"), self.slope, self.intercept
        return self._reduction("sum"), self.slope / self.slices, self.intercept

    def _reduction(self, kind: str) -> NDArray[Any]:
        found = self._reductions.get(kind)
        if found is not None:
            return found
        stored = self.stored
        dtype = stored.dtype  # the maximum and minimum, and a sum that fits
        narrow = stored.dtype.kind in "iu" and stored.dtype.itemsize <= 2
        if kind == "sum" and not (narrow and self._sum_fits()):
            # float32 holds any sum of up to 255 16-bit values exactly (< 2**24)
            dtype = np.dtype(np.float64 if stored.itemsize > 2 else np.float32)
        out = self.scratch.get(kind, stored.shape[1:], dtype) if self.scratch is not None else None
        if kind == "max":
            reduced: NDArray[Any] = stored.max(axis=0, out=out)
        elif kind == "min":
            reduced = stored.min(axis=0, out=out)
        else:
            reduced = stored.sum(axis=0, dtype=dtype, out=out)
        self._reductions[kind] = reduced
        return reduced

    def _sum_fits(self) -> bool:
        """Whether the slab's sum fits its stored integer type (from the maximum and minimum,
        which a MIP of the slab has already made)."""
        limits = np.iinfo(self.stored.dtype)  # type: ignore[type-var]
        high = int(self._reduction("max").max()) * self.slices
        low = int(self._reduction("min").min()) * self.slices if self.stored.dtype.kind == "i" else 0
        return limits.min <= low and high <= limits.max

    def project(self, projection: str) -> Values:
        """The slab's projection (:func:`project`) in values (float32)."""
        reduced, slope, intercept = self.reduce(projection)
        return _rescaled(reduced, slope, intercept)


def windowed(
    reduced: NDArray[Any],
    slope: float,
    intercept: float,
    center: float,
    width: float,
    scratch: Scratch | None = None,
) -> Gray8:
    """:func:`apply_window` of ``reduced * slope + intercept`` in one fused multiply-add (float32),
    without the image of values in between (its work array from ``scratch`` when given). A
    table look-up by stored value was slower in the whole pipeline: its index array is four
    times the image."""
    if width == 1:
        return apply_window(_rescaled(reduced, slope, intercept), WindowChoice(center, width, "step"))
    # ((v - (c - 0.5)) / (w - 1) + 0.5) * 255 with v = x * slope + intercept, as x * a + b
    a = slope * 255.0 / (width - 1)
    b = ((intercept - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    work = scratch.get("window", reduced.shape, np.float32) if scratch is not None else None
    scaled = np.multiply(reduced, np.float32(a), dtype=np.float32, out=work)
    scaled += np.float32(b)
    np.clip(scaled, 0, 255, out=scaled)
    np.rint(scaled, out=scaled)
    out: Gray8 = scaled.astype(np.uint8)
    return out


def stack(
    slab: Slab, reader: SliceReader
) -> tuple[SlabValues, list[ChosenFrame], list[tuple[ChosenFrame, str]]]:
    """The slab's slices read once into one (slices, rows, columns) array; slices that cannot be
    read or do not match the first one's size are returned apart with the reason.

    Plain slices are read straight into the reader's buffer (:meth:`SliceReader.buffer`), so the
    array returned is valid until the reader stacks the next slab."""
    count = len(slab.members)
    volume: NDArray[Any] | None = None
    converted = False  # the volume holds values (float32), not the stored integers
    slope, intercept = 1.0, 0.0
    used: list[ChosenFrame] = []
    skipped: list[tuple[ChosenFrame, str]] = []

    def slot(shape: tuple[int, int], dtype: np.dtype[Any]) -> NDArray[Any] | None:
        nonlocal volume
        if volume is None:
            volume = reader.buffer(count, shape, dtype)
        if converted or volume.shape[1:] != shape or volume.dtype != dtype:
            return None
        place: NDArray[Any] = volume[len(used)]
        return place

    for member in slab.members:
        try:
            raw, member_slope, member_intercept = reader.stored(member, slot)
        except ImageSkipped as exc:
            skipped.append((member, str(exc)))
            continue
        if not used:  # the first slice read decides the slab's size, type and rescale
            if volume is None or (volume.shape[1:], volume.dtype) != (raw.shape, raw.dtype):
                volume = reader.buffer(count, raw.shape, raw.dtype)
            slope, intercept = member_slope, member_intercept
        assert volume is not None
        if raw.shape != volume.shape[1:]:
            skipped.append((member, f"{raw.shape[0]}x{raw.shape[1]} pixels, unlike the rest of its slab"))
            continue
        if not converted and (raw.dtype, member_slope, member_intercept) != (volume.dtype, slope, intercept):
            # A slice whose rescale (or type) differs from the first's: values from here on.
            done = _rescaled(volume[: len(used)], slope, intercept)
            volume = np.empty(volume.shape, dtype=np.float32)
            volume[: len(used)] = done
            slope, intercept, converted = 1.0, 0.0, True
        if converted:
            volume[len(used)] = _rescaled(raw, member_slope, member_intercept)
        elif not np.may_share_memory(raw, volume):  # not read straight into its place
            volume[len(used)] = raw
        used.append(member)
    if volume is None or not used:
        return SlabValues(np.zeros((0, 0, 0), dtype=np.float32)), used, skipped
    return SlabValues(volume[: len(used)], slope, intercept, reader.scratch), used, skipped


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
    values: SlabValues,
    window: WindowSpec,
    monochrome1: bool,
    frame_index: int,
    spacing: tuple[float, float] | None,
) -> DisplayFrame:
    """A slab's projection in one window (or three, as RGB) to display pixels."""
    reduced, slope, intercept = values.reduce(window.projection)
    if window.rgb is not None:
        channels = [windowed(reduced, slope, intercept, c, w, values.scratch) for c, w in window.rgb]
        pixels = np.ascontiguousarray(np.stack(channels, axis=2))
    else:
        pixels = windowed(reduced, slope, intercept, window.center, window.width, values.scratch)
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
    comes from. MIP: the slice of the brightest voxel in the box (the one the tile shows there);
    MinIP: the darkest. Average (and the RGB windows, an average): the slice whose voxel in the
    box differs most from the slab's mean there, both clipped to what the window shows (for RGB,
    the widest channel's range): a bleed lands on its slice and so does a dark infarct, while
    bone beyond the window's top, on every slice alike, pulls nowhere. When nothing in the box
    differs (a uniform region), the slab's middle slice. Reads the slab's slices again: only
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
    elif projection == "mip":
        flat = int(np.argmax(cube))
    else:
        channels = window.rgb or ((window.center, window.width),)
        low, high = min(c - w / 2 for c, w in channels), max(c + w / 2 for c, w in channels)
        shown = np.clip(cube, low, high)
        deviation = np.abs(shown - shown.mean(axis=0))
        flat = int(np.argmax(deviation))
        if not deviation.flat[flat] > 0:
            return members[(len(members) - 1) // 2]
    return kept[np.unravel_index(flat, cube.shape)[0]]
