"""The fast slice reader (analysis.native) reads exactly what pydicom reads, or leaves the file to
pydicom; a slab stacked from it projects to the same values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from analysis.native import read_native
from analysis.selection import ChosenFrame
from analysis.slabs import Slab
from analysis.volume import SliceReader, stack
from tests.analysis.test_selection import image
from tests.data.phantom import new_instance


def _slice(
    path: Path,
    pixels: np.ndarray,
    *,
    syntax: str = ExplicitVRLittleEndian,
    bits_stored: int | None = None,
    slope: object = 1,
    intercept: object = -1024,
    extra: dict[str, object] | None = None,
    trailing_padding: bool = False,
) -> Path:
    ds = new_instance(path, CTImageStorage, UID(syntax))
    ds.Modality = "CT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    allocated = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored = allocated, bits_stored or allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    # An undefined-length sequence with a nested one before the pixel module, as scanners write.
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "1", "99X", "x"
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, generate_uid()
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item])
    ds.ReferencedImageSequence.is_undefined_length = True
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    if trailing_padding:
        ds.add_new(0xFFFCFFFC, "OB", b"\0" * 64)
    ds.save_as(path, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return path


def _same_as_pydicom(path: Path) -> None:
    fast = read_native(path)
    assert fast is not None
    ds = dcmread(path)
    expected = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    got = fast.pixels.astype(np.float32) * np.float32(fast.slope) + np.float32(fast.intercept)
    np.testing.assert_array_equal(got, expected)


RNG = np.random.default_rng(7)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_plain_slices_read_as_pydicom_reads_them(tmp_path: Path, syntax: str) -> None:
    unsigned = RNG.integers(0, 4096, (24, 20)).astype(np.uint16)
    _same_as_pydicom(_slice(tmp_path / "u16.dcm", unsigned, syntax=syntax))
    signed = RNG.integers(-2000, 3000, (24, 20)).astype(np.int16)
    _same_as_pydicom(_slice(tmp_path / "i16.dcm", signed, syntax=syntax, slope="2.5", intercept="-7"))
    # 12 of 16 bits stored, garbage in the top bits (an overlay): masked as PS3.5 8.1.1 says
    dirty = unsigned | np.uint16(0xF000)
    _same_as_pydicom(_slice(tmp_path / "u12.dcm", dirty, syntax=syntax, bits_stored=12))
    _same_as_pydicom(
        _slice(tmp_path / "u8.dcm", RNG.integers(0, 255, (7, 9)).astype(np.uint8), syntax=syntax)
    )
    # no rescale at all (MR), and a padded dataset (the pixel data is not the last element)
    _same_as_pydicom(_slice(tmp_path / "mr.dcm", unsigned, syntax=syntax, slope=None, intercept=None))
    _same_as_pydicom(_slice(tmp_path / "pad.dcm", unsigned, syntax=syntax, trailing_padding=True))
    _same_as_pydicom(Path(str(get_testdata_file("CT_small.dcm"))))  # GE private groups, padding


def test_what_it_does_not_read_exactly_is_left_to_pydicom(tmp_path: Path) -> None:
    pixels = RNG.integers(0, 4096, (16, 16)).astype(np.uint16)
    lut = Dataset()
    lut.LUTDescriptor, lut.ModalityLUTType = [4096, 0, 16], "HU"
    lut.LUTData = np.arange(4096, dtype="<u2").tobytes()
    cases: dict[str, dict[str, object]] = {
        "multi-frame": {"NumberOfFrames": 1},
        "modality LUT sequence": {"ModalityLUTSequence": Sequence([lut])},
    }
    for name, extra in cases.items():
        assert read_native(_slice(tmp_path / f"{name}.dcm", pixels, extra=extra)) is None, name
    signed12 = RNG.integers(-2000, 2000, (16, 16)).astype(np.int16)
    assert read_native(_slice(tmp_path / "s12.dcm", signed12, bits_stored=12)) is None  # sign extension
    assert read_native(Path(str(get_testdata_file("MR_small_RLE.dcm")))) is None  # compressed
    whole = _slice(tmp_path / "cut.dcm", pixels).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[:-100])
    assert read_native(tmp_path / "cut.dcm") is None  # shorter than its pixels
    (tmp_path / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    assert read_native(tmp_path / "junk.dcm") is None


def test_a_slab_stacked_from_mixed_slices_projects_as_their_values(tmp_path: Path) -> None:
    """Slices whose rescales differ (PET) are stacked as values; the projections are the same
    as of the values read one by one."""
    paths = [
        _slice(tmp_path / f"{i}.dcm", RNG.integers(0, 4096, (12, 10)).astype(np.uint16), slope=s, intercept=b)
        for i, (s, b) in enumerate([(1, -1024), (1, -1024), (2, -1000), (1, -1024)])
    ]
    frames = [
        ChosenFrame(image(f"1.{i}", path=path, position=(0.0, 0.0, float(i))), 0, "", float(i))
        for i, path in enumerate(paths)
    ]
    reader = SliceReader()
    values, used, skipped = stack(Slab(tuple(frames), 1.0), reader)
    assert len(used) == 4 and not skipped
    one_by_one = np.stack([reader.values(f) for f in frames])
    np.testing.assert_allclose(values.project("mip"), one_by_one.max(axis=0))
    np.testing.assert_allclose(values.project("minip"), one_by_one.min(axis=0))
    np.testing.assert_allclose(values.project("average"), one_by_one.mean(axis=0), rtol=1e-6)
    # and a slab of one rescale keeps the stored integers, with the same projections
    same, _, _ = stack(Slab(tuple(frames[:2]), 1.0), reader)
    assert same.stored.dtype == np.uint16
    np.testing.assert_array_equal(same.project("mip"), one_by_one[:2].max(axis=0))
