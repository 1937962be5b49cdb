"""Test studies generated from pydicom's and pydicom-data's sample files, with new UIDs."""

from __future__ import annotations

import copy
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import FileDataset
from pydicom.uid import generate_uid

CT_512 = "693_UNCI.dcm"  # CT 512 x 512, 16 bit, Explicit VR Little Endian (pydicom-data)


def sample(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"sample file {name!r} is not installed (pydicom-data?)")
    return Path(str(path))


def write_series(
    out_dir: Path,
    count: int,
    source: str = CT_512,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> list[Path]:
    """Write ``count`` instances of one series copied from ``source``, each with its own SOP
    Instance UID and a slice position 1.25 mm apart."""
    out_dir.mkdir(parents=True, exist_ok=True)
    template = dcmread(sample(source))
    study = study_instance_uid or generate_uid()
    series = series_instance_uid or generate_uid()
    paths: list[Path] = []
    for index in range(count):
        ds: FileDataset = copy.deepcopy(template)
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.InstanceNumber = index + 1
        if "ImagePositionPatient" in ds:
            x, y, _ = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, y, -100.0 + 1.25 * index]
        path = out_dir / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information: what travelled over DIMSE."""
    raw = path.read_bytes()
    meta_length = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL value
    return raw[144 + meta_length :]
