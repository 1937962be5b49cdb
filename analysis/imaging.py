"""Pixels to display images: the grayscale pipeline of PS3.3 C.11 and the colour models of
PS3.3 C.7.6.3.1.2, vectorised with numpy.

Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence), then a VOI window (a preset
chosen for the modality and body part, else the header's window, else robust percentiles),
MONOCHROME1 inverted, colour converted to RGB, 8 bits out. Every choice is recorded in a
:class:`WindowChoice` so a radiologist can see what the model was shown.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.pixels.utils import iter_pixels

from analysis.errors import ImageSkipped
from analysis.windows import ct_window_names, header_window
from conf.settings import DEFAULT_CT_WINDOW_BY_BODY_PART

# Window presets (center, width) in Hounsfield units.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "soft_tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),  # blood against the skull's inner table
    "stroke": (32.0, 8.0),  # grey-white loss in early infarction
}
MAX_SOURCE_PIXELS = 40_000_000  # per frame: 6k x 6k; larger (a 10k x 10k scan) is skipped, not decoded
PERCENTILES = (1.0, 99.0)

Gray8 = NDArray[np.uint8]


@dataclass(frozen=True)
class WindowChoice:
    center: float
    width: float
    explanation: str  # "preset lung", "header", "percentiles 1-99", "rgb", ...

    def __post_init__(self) -> None:
        if not self.width >= 1:
            raise ValueError(f'Argument "width" must be at least 1, got {self.width}')


@dataclass(frozen=True)
class DisplayFrame:
    """One frame ready for display: uint8 (rows, cols) grayscale or (rows, cols, 3) RGB."""

    pixels: Gray8
    frame_index: int
    window: WindowChoice
    pixel_spacing: tuple[float, float] | None


def apply_window(values: NDArray[np.floating], window: WindowChoice) -> Gray8:
    """The linear VOI function of PS3.3 C.11.2.1.2.1 to 0..255.

    ``x <= c - 0.5 - (w-1)/2`` gives 0, ``x > c - 0.5 + (w-1)/2`` gives 255, linear between.
    """
    c, w = window.center, window.width
    if w == 1:
        step: Gray8 = np.where(values > c - 0.5, 255, 0).astype(np.uint8)
        return step
    scaled = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    out: Gray8 = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return out


def choose_window(
    ds: Dataset,
    values: NDArray[np.floating],
    ct_preset_by_body_part: Mapping[str, Sequence[str]] = DEFAULT_CT_WINDOW_BY_BODY_PART,
    ct_default_preset: str = "mediastinum",
) -> WindowChoice:
    """CT: the first preset for the body part (the model needs lung windows for lungs, whatever
    the header says); without a known body part, the anatomy judged from the image
    (:func:`analysis.windows.ct_anatomy`: a head gets the brain window). Others: the header's first
    window when it is usable, else robust percentiles."""
    modality = str(ds.get("Modality", "")).upper()
    if modality == "CT":
        name, reason = ct_window_names(ds, values, ct_preset_by_body_part, ct_default_preset)[0]
        if name not in CT_PRESETS:
            raise ValueError(f'CT window preset must be one of {sorted(CT_PRESETS)}, got "{name}"')
        explanation = (
            f"preset {name}"
            if reason.startswith(("Body Part", "no body part"))
            else f"preset {name} ({reason})"
        )
        return WindowChoice(*CT_PRESETS[name], explanation)
    header_center, header_width = header_window(ds)
    if header_center is not None and header_width is not None and header_width >= 1:
        return WindowChoice(header_center, header_width, "header")
    low, high = np.percentile(values, PERCENTILES)
    if not high > low:
        raise ImageSkipped("constant image: every pixel has the same value")
    return WindowChoice(float(low + high) / 2 + 0.5, float(high - low) + 1, "percentiles 1-99")


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        return (float(spacing[0]), float(spacing[1])) if spacing else None
    except (TypeError, ValueError, IndexError):
        return None


def _to_uint8_rgb(frame: NDArray[np.generic], ds: Dataset) -> Gray8:
    if frame.dtype == np.uint8:
        return frame.astype(np.uint8, copy=False)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)))
    shifted = frame.astype(np.uint32) >> max(bits - 8, 0)
    out: Gray8 = np.clip(shifted, 0, 255).astype(np.uint8)
    return out


def render_frame(
    ds: Dataset,
    frame: NDArray[np.generic],
    frame_index: int,
    ct_preset_by_body_part: Mapping[str, Sequence[str]] = DEFAULT_CT_WINDOW_BY_BODY_PART,
) -> DisplayFrame:
    """One decoded frame to display pixels."""
    if frame.ndim < 2 or min(frame.shape[:2]) < 2:
        raise ImageSkipped(f"image is {'x'.join(map(str, frame.shape))} pixels: too small to show")
    if frame.shape[0] * frame.shape[1] > MAX_SOURCE_PIXELS:
        raise ImageSkipped(f"frame of {frame.shape[0]}x{frame.shape[1]} pixels exceeds the limit")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    spacing = _pixel_spacing(ds)
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds)
        return DisplayFrame(_to_uint8_rgb(rgb, ds), frame_index, WindowChoice(127.5, 256, "palette"), spacing)
    if frame.ndim == 3:  # RGB (pydicom converts YBR to RGB while decoding)
        return DisplayFrame(_to_uint8_rgb(frame, ds), frame_index, WindowChoice(127.5, 256, "rgb"), spacing)
    values = apply_modality_lut(frame, ds).astype(np.float32, copy=False)
    if not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    window = choose_window(ds, values, ct_preset_by_body_part)
    if window.explanation.startswith("percentiles") and "VOILUTSequence" in ds:
        # No usable window but a VOI LUT (PS3.3 C.11.2.1.1): apply it, then stretch its output.
        values = apply_voi(np.rint(values).astype(np.int32), ds).astype(np.float32, copy=False)
        low, high = float(values.min()), float(values.max())
        window = WindowChoice((low + high) / 2 + 0.5, max(high - low + 1, 1.0), "header VOI LUT")
    pixels = apply_window(values, window)
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
    return DisplayFrame(pixels, frame_index, window, spacing)


def render_file(
    path: Path,
    frames: list[int] | None = None,
    ct_preset_by_body_part: Mapping[str, Sequence[str]] = DEFAULT_CT_WINDOW_BY_BODY_PART,
) -> Iterator[DisplayFrame | ImageSkipped]:
    """Decode and render the given frames (all when None) of one file. A frame that cannot be
    decoded or shown yields an :class:`ImageSkipped` with the reason instead of raising."""
    try:
        ds = dcmread(path, defer_size="1 MB")  # pixel data of a large file stays on disk for now
        rows, columns = int(ds.get("Rows", 0)), int(ds.get("Columns", 0))
        if rows * columns > MAX_SOURCE_PIXELS:
            raise ImageSkipped(f"frame of {rows}x{columns} pixels exceeds the limit; not decoded")
        decoded = iter_pixels(ds, indices=frames)
        index_iter = iter(frames) if frames is not None else None
        for position, frame in enumerate(decoded):
            index = next(index_iter) if index_iter is not None else position
            try:
                yield render_frame(ds, frame, index, ct_preset_by_body_part)
            except ImageSkipped as skipped:
                yield skipped
    except ImageSkipped as skipped:
        yield skipped
    except Exception as exc:  # any decoder failure: skip this image, keep the study
        yield ImageSkipped(f"cannot decode pixels ({type(exc).__name__}: {str(exc)[:200]})")
