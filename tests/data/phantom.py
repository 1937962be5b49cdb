"""Synthetic CT phantoms written as real DICOM series (pydicom): a chest with lungs, body, spine,
vessels as bright tubes, noise and small nodules at known places; a head with skull, brain,
ventricles and a small hyperdense bleed. For the imaging tests and ``benchmarks/imaging.py``."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

INTERCEPT = -1024.0


@dataclass(frozen=True)
class Sphere:
    """A ball of ``hu`` at (column, row) pixels and ``z`` mm, ``diameter_mm`` across."""

    column: float
    row: float
    z: float
    diameter_mm: float
    hu: float


@dataclass(frozen=True)
class Phantom:
    paths: list[Path]
    positions: list[float]  # z of each slice, mm, in slice order
    spheres: list[Sphere]
    pixel_mm: float
    study_instance_uid: str
    series_instance_uid: str


def new_instance(path: Path, sop_class: str, transfer_syntax: str = ExplicitVRLittleEndian) -> FileDataset:
    """An empty Part 10 data set of ``sop_class`` with a new SOP Instance UID, in its file meta
    and its body, to be saved at ``path``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(transfer_syntax)
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return ds


def _header(
    study: str, series: str, rows: int, columns: int, pixel_mm: float, thickness_mm: float
) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.PatientName, ds.PatientID = "Phantom^Synthetic", "PHANTOM"
    ds.Rows, ds.Columns = rows, columns
    ds.PixelSpacing = [pixel_mm, pixel_mm]
    ds.SliceThickness = thickness_mm
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleIntercept, ds.RescaleSlope = INTERCEPT, 1
    return ds


def write_volume(
    out_dir: Path,
    slices: Sequence[NDArray[np.float32]] | NDArray[np.float32],
    positions: Sequence[float],
    pixel_mm: float,
    *,
    body_part: str | None = None,
    series_description: str | None = None,
    window: tuple[float, float] | None = None,
    instance_numbers: Sequence[int] | None = None,
    study_instance_uid: str | None = None,
) -> tuple[list[Path], str, str]:
    """One CT series from HU slices: each file its own SOP instance at ``positions[i]`` mm."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series = study_instance_uid or generate_uid(), generate_uid()
    rows, columns = slices[0].shape
    spacing = abs(positions[1] - positions[0]) if len(positions) > 1 else 1.0
    paths: list[Path] = []
    for index, (values, z) in enumerate(zip(slices, positions, strict=True)):
        ds = _header(study, series, rows, columns, pixel_mm, spacing)
        sop = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.InstanceNumber = instance_numbers[index] if instance_numbers is not None else index + 1
        ds.ImagePositionPatient = [-columns * pixel_mm / 2, -rows * pixel_mm / 2, float(z)]
        if body_part:
            ds.BodyPartExamined = body_part
        if series_description:
            ds.SeriesDescription = series_description
        if window:
            ds.WindowCenter, ds.WindowWidth = window
        stored = np.clip(np.rint(np.asarray(values) - INTERCEPT), 0, 65535).astype("<u2")
        ds.PixelData = stored.tobytes()
        path = out_dir / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths, study, series


def write_enhanced_volume(
    path: Path,
    slices: Sequence[NDArray[np.float32]],
    positions: Sequence[float],
    pixel_mm: float,
    *,
    frame_order: Sequence[int] | None = None,
    intercepts: Sequence[float] | None = None,
    stacks: Sequence[str] | None = None,
    body_part: str | None = "CHEST",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> tuple[str, str]:
    """One Enhanced CT Image (PS3.3 A.38) holding the HU ``slices`` as frames: frame ``k`` is
    slice ``frame_order[k]`` (so frames need not be stored in position order), each placed by
    its Per-Frame Functional Groups' Plane Position at ``positions[slice]`` mm, with its own Pixel
    Value Transformation (``intercepts[k]``) and Frame Content (``stacks[k]`` as Stack ID).
    Returns (study, series) UIDs."""
    order = list(frame_order) if frame_order is not None else list(range(len(slices)))
    rows, columns = slices[0].shape
    ds = new_instance(path, EnhancedCTImageStorage)
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.PatientName, ds.PatientID = "Phantom^Synthetic", "PHANTOM"
    if body_part:
        ds.BodyPartExamined = body_part
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = rows, columns
    ds.NumberOfFrames = len(order)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    measures, orientation = Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [pixel_mm, pixel_mm], 1.0
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared = Dataset()
    shared.PixelMeasuresSequence = DicomSequence([measures])
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    frames: list[Dataset] = []
    stored: list[NDArray[np.uint16]] = []
    for k, index in enumerate(order):
        intercept = intercepts[k] if intercepts is not None else INTERCEPT
        plane, transformation, content = Dataset(), Dataset(), Dataset()
        plane.ImagePositionPatient = [-columns * pixel_mm / 2, -rows * pixel_mm / 2, float(positions[index])]
        transformation.RescaleIntercept, transformation.RescaleSlope = intercept, 1
        transformation.RescaleType = "HU"
        if stacks is not None:
            content.StackID = stacks[k]
        content.InStackPositionNumber = index + 1
        item = Dataset()
        item.PlanePositionSequence = DicomSequence([plane])
        item.PixelValueTransformationSequence = DicomSequence([transformation])
        item.FrameContentSequence = DicomSequence([content])
        frames.append(item)
        stored.append(np.clip(np.rint(np.asarray(slices[index]) - intercept), 0, 65535).astype("<u2"))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(frames)
    ds.PixelData = np.stack(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _grid(size: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    rows, columns = np.mgrid[0:size, 0:size].astype(np.float32)
    return rows, columns


def _draw_spheres(
    values: NDArray[np.float32],
    z: float,
    spheres: Sequence[Sphere],
    pixel_mm: float,
    rows: NDArray[np.float32],
    columns: NDArray[np.float32],
) -> None:
    for sphere in spheres:
        radius = sphere.diameter_mm / 2
        dz = z - sphere.z
        if abs(dz) >= radius:
            continue
        disk = np.sqrt(radius**2 - dz**2) / pixel_mm
        inside = (columns - sphere.column) ** 2 + (rows - sphere.row) ** 2 <= disk**2
        values[inside] = sphere.hu


def chest_ct(
    out_dir: Path,
    slices: int = 300,
    spacing_mm: float = 1.25,
    size: int = 512,
    pixel_mm: float = 0.7,
    nodules: Sequence[float] = (4.0, 5.0, 6.0) * 4,
    seed: int = 12,
    noise_hu: float = 15.0,
) -> Phantom:
    """A chest CT: body (fat and muscle), two lungs, spine, vessels as bright branching tubes
    that drift along z, Gaussian noise, and solid nodules (40 HU) of the given diameters at
    random places inside the lungs, away from the vessels."""
    rng = np.random.default_rng(seed)
    picker = random.Random(seed)
    rows, columns = _grid(size)
    c = size / 2
    body = ((columns - c) / (0.46 * size)) ** 2 + ((rows - c) / (0.34 * size)) ** 2 <= 1
    inner = ((columns - c) / (0.43 * size)) ** 2 + ((rows - c) / (0.31 * size)) ** 2 <= 1
    lungs = [
        ((columns - (c + sign * 0.2 * size)) / (0.15 * size)) ** 2 + ((rows - c * 0.97) / (0.24 * size)) ** 2
        <= 1
        for sign in (-1, 1)
    ]
    lung = lungs[0] | lungs[1]
    spine = (columns - c) ** 2 + (rows - (c + 0.22 * size)) ** 2 <= (0.05 * size) ** 2
    positions = [-200.0 + spacing_mm * i for i in range(slices)]
    length = positions[-1] - positions[0]
    vessels = []  # (column0, row0, drift columns/mm, drift rows/mm, radius px)
    for _ in range(14):
        side = picker.choice((-1, 1))
        vessels.append(
            (
                c + side * 0.2 * size + picker.uniform(-0.09, 0.09) * size,
                c + picker.uniform(-0.16, 0.16) * size,
                picker.uniform(-0.15, 0.15),
                picker.uniform(-0.15, 0.15),
                picker.uniform(1.0, 2.2) / pixel_mm,
            )
        )
    spheres: list[Sphere] = []
    margin = 12.0
    for diameter in nodules:
        for _ in range(1000):
            z = picker.uniform(positions[0] + margin, positions[-1] - margin)
            column, row = picker.uniform(0, size), picker.uniform(0, size)
            r, k = int(row), int(column)
            if not (0 <= r < size and 0 <= k < size and lung[r, k]):
                continue
            # Inside the lung with room around it, away from every vessel and other nodule.
            ring = int(12 / pixel_mm)
            if not lung[max(r - ring, 0) : r + ring, max(k - ring, 0) : k + ring].all():
                continue
            dz = z - positions[0]
            if any(
                np.hypot(column - (v[0] + v[2] * dz / pixel_mm), row - (v[1] + v[3] * dz / pixel_mm))
                < 20 / pixel_mm
                for v in vessels
            ):
                continue
            if any(
                abs(s.z - z) < 15 and np.hypot(s.column - column, s.row - row) < 30 / pixel_mm
                for s in spheres
            ):
                continue
            spheres.append(Sphere(column, row, z, diameter, 40.0))
            break
    volume: list[NDArray[np.float32]] = []
    for z in positions:
        values = np.full((size, size), -1000.0, dtype=np.float32)
        values[body] = -100.0  # fat
        values[inner] = 40.0  # muscle, mediastinum
        values[lung] = -850.0
        values[spine] = 700.0
        dz = z - positions[0]
        for x0, y0, dx, dy, radius in vessels:
            wobble = 3 * np.sin(dz / max(length, 1) * 6)
            tube = (columns - (x0 + dx * dz / pixel_mm + wobble)) ** 2 + (
                rows - (y0 + dy * dz / pixel_mm)
            ) ** 2 <= radius**2
            values[tube & lung] = 40.0
        _draw_spheres(values, z, spheres, pixel_mm, rows, columns)
        values += rng.normal(0.0, noise_hu, values.shape).astype(np.float32)
        volume.append(values)
    paths, study, series = write_volume(out_dir, volume, positions, pixel_mm, body_part="CHEST")
    return Phantom(paths, positions, spheres, pixel_mm, study, series)


def head_ct(
    out_dir: Path,
    slices: int = 40,
    spacing_mm: float = 2.5,
    size: int = 256,
    pixel_mm: float = 0.9,
    bleed_mm: float = 8.0,
    seed: int = 5,
    body_part: str | None = None,
    series_description: str | None = None,
) -> Phantom:
    """A head CT without Body Part Examined unless given: skull, brain (35 HU), ventricles
    (5 HU), noise, and a hyperdense bleed (70 HU) of ``bleed_mm`` in one hemisphere."""
    rng = np.random.default_rng(seed)
    rows, columns = _grid(size)
    c = size / 2
    positions = [spacing_mm * i for i in range(slices)]
    bleed = Sphere(c + 35 / pixel_mm, c - 15 / pixel_mm, positions[slices // 2] + 1.0, bleed_mm, 70.0)
    volume: list[NDArray[np.float32]] = []
    for z in positions:
        taper = max(0.55, 1 - ((z - positions[slices // 2]) / (slices * spacing_mm)) ** 2)
        a, b = 75 / pixel_mm * taper, 90 / pixel_mm * taper
        outer = ((columns - c) / a) ** 2 + ((rows - c) / b) ** 2 <= 1
        brain = ((columns - c) / (a - 7 / pixel_mm)) ** 2 + ((rows - c) / (b - 7 / pixel_mm)) ** 2 <= 1
        values = np.full((size, size), -1000.0, dtype=np.float32)
        values[outer] = 1200.0  # skull
        values[brain] = 35.0
        ventricles = ((columns - c) / (12 / pixel_mm)) ** 2 + ((rows - c) / (25 / pixel_mm)) ** 2 <= 1
        values[ventricles & brain] = 5.0
        _draw_spheres(values, z, [bleed], pixel_mm, rows, columns)
        values += rng.normal(0.0, 4.0, values.shape).astype(np.float32)
        volume.append(values)
    paths, study, series = write_volume(
        out_dir, volume, positions, pixel_mm, body_part=body_part, series_description=series_description
    )
    return Phantom(paths, positions, [bleed], pixel_mm, study, series)
