"""Test studies generated from pydicom's and pydicom-data's sample files, with new UIDs."""

from __future__ import annotations

import copy
from pathlib import Path

from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import generate_uid

CT_512 = "693_UNCI.dcm"  # CT 512 x 512, 16 bit, Explicit VR Little Endian (pydicom-data)
CT_SMALL = "CT_small.dcm"  # CT 128 x 128, 16 bit, 39 KB, Explicit VR Little Endian (pydicom)


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


IDENTIFYING = {  # distinctive tokens, so a hit in what leaves the node can only be a leak
    "PatientName": "Doemann^Janeth^Quorra",
    "PatientID": "MRN-4471-0932",
    "PatientBirthDate": "19480317",
    "AccessionNumber": "ACC99812",
    "InstitutionName": "Elsewhereton Infirmary",
    "ReferringPhysicianName": "Houseman^Gregor",
    "StudyDescription": "Dyspnoea Doemann followup",
    "SeriesDescription": "Janeth Qzvort protocol",
    "OperatorsName": "Technik^Terrwyn",
}


def identify(paths: list[Path]) -> None:
    """Fill every identifying header a hospital's images carry with :data:`IDENTIFYING`."""
    for path in paths:
        ds = dcmread(path)
        for keyword, value in IDENTIFYING.items():
            setattr(ds, keyword, value)
        ds.save_as(path)


def identifying_tokens() -> list[str]:
    return [part for value in IDENTIFYING.values() for part in value.replace("^", " ").split()]


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta Information: what travelled over DIMSE."""
    raw = path.read_bytes()
    meta_length = int.from_bytes(raw[140:144], "little")  # (0002,0000) UL value
    return raw[144 + meta_length :]


def assert_same_dataset(received: Path, original: Path) -> None:
    """Same transfer syntax, same elements and values, byte-identical pixel data (compressed
    fragments included). DCMTK senders re-encode sequence lengths and drop padding on the way,
    so the bytes around the pixels are compared element by element, not byte by byte."""
    a, b = dcmread(received), dcmread(original)
    if a.file_meta.TransferSyntaxUID != b.file_meta.TransferSyntaxUID:
        raise AssertionError(
            f"transfer syntax {a.file_meta.TransferSyntaxUID} != {b.file_meta.TransferSyntaxUID}"
        )
    if a.get("PixelData") != b.get("PixelData"):
        raise AssertionError(f"pixel data of {received.name} differs from {original.name}")

    def elements(ds: Dataset) -> dict[int, object]:
        # DCMTK drops trailing padding and group lengths when it re-encodes.
        return {int(e.tag): e.value for e in ds if e.tag != 0xFFFCFFFC and e.tag.element != 0}

    if elements(a) != elements(b):
        raise AssertionError(f"dataset {received.name} differs from {original.name}")


def main() -> None:
    """``python -m tests.data.generate OUT_DIR``: a small sample study (20-slice CT and a chest
    radiograph) with fresh UIDs, for trying the node by hand."""
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else "sample-study")
    study = generate_uid()
    files = [
        *write_series(out / "ct", 20, study_instance_uid=study),
        *write_series(out / "cr", 1, source="RG1_UNCI.dcm", study_instance_uid=study),
    ]
    print(f"wrote {len(files)} instances of study {study} under {out}/")


if __name__ == "__main__":
    main()
