"""The pre-acknowledgement dataset check on real sample files and on broken copies of them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from scp.dataset_check import check_dataset_file
from scp.errors import DatasetCorrupt, DatasetMismatch
from tests.data.generate import sample

GOOD = [
    "CT_small.dcm",  # explicit little endian
    "MR_small_implicit.dcm",  # implicit little endian
    "OBXXXX1A_expb.dcm",  # explicit big endian
    "image_dfl.dcm",  # deflated
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline
    "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless
    "color3d_jpeg_baseline.dcm",  # multi-frame
]


def _request_uids(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID)


@pytest.mark.parametrize("name", GOOD)
def test_sample_files_pass_and_are_summarised(name: str) -> None:
    path = sample(name)
    sop_class, sop_instance = _request_uids(path)
    summary = check_dataset_file(path, sop_class, sop_instance)
    ds = dcmread(path, stop_before_pixels=True)
    assert summary.study_instance_uid == ds.StudyInstanceUID
    assert summary.series_instance_uid == ds.SeriesInstanceUID
    assert summary.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert summary.encapsulated == ds.file_meta.TransferSyntaxUID.is_compressed


@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG2000.dcm", "MR_small_implicit.dcm"])
@pytest.mark.parametrize("cut", [1, 100, 1000])
def test_truncated_data_cannot_be_understood(tmp_path: Path, name: str, cut: int) -> None:
    source = sample(name)
    broken = tmp_path / "truncated.dcm"
    broken.write_bytes(source.read_bytes()[:-cut])
    with pytest.raises(DatasetCorrupt, match=r"runs past|remain|truncated"):
        check_dataset_file(broken, *_request_uids(source))


def test_garbage_after_the_file_meta_cannot_be_understood(tmp_path: Path) -> None:
    source = sample("CT_small.dcm")
    raw = source.read_bytes()
    meta_end = 144 + int.from_bytes(raw[140:144], "little")
    broken = tmp_path / "garbage.dcm"
    broken.write_bytes(raw[:meta_end] + bytes(range(7, 256)) * 40)
    with pytest.raises(DatasetCorrupt, match=r"invalid VR|past|remain"):
        check_dataset_file(broken, *_request_uids(source))


def test_the_shipped_truncated_sample_is_refused() -> None:
    path = sample("MR_truncated.dcm")
    with pytest.raises(DatasetCorrupt, match=r"\(7FE0,0010\).*declares 8192 bytes"):
        check_dataset_file(path, *_request_uids(path))


def test_uids_that_differ_from_the_request_do_not_match(tmp_path: Path) -> None:
    path = sample("CT_small.dcm")
    sop_class, sop_instance = _request_uids(path)
    with pytest.raises(DatasetMismatch, match="SOP Instance UID in the dataset"):
        check_dataset_file(path, sop_class, sop_instance + ".9")
    with pytest.raises(DatasetMismatch, match="SOP Class UID in the dataset"):
        check_dataset_file(path, "1.2.840.10008.5.1.4.1.1.4", sop_instance)


def test_pixel_data_shorter_than_its_description_does_not_match(tmp_path: Path) -> None:
    ds = dcmread(sample("CT_small.dcm"))
    ds.Rows = ds.Rows * 2  # the header now promises twice the pixels that follow
    path = tmp_path / "short.dcm"
    ds.save_as(path)
    with pytest.raises(DatasetMismatch, match=r"pixel data is 32768 bytes but Rows 256"):
        check_dataset_file(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def test_missing_study_uid_does_not_match(tmp_path: Path) -> None:
    ds = dcmread(sample("CT_small.dcm"))
    del ds.StudyInstanceUID
    path = tmp_path / "nostudy.dcm"
    ds.save_as(path)
    with pytest.raises(DatasetMismatch, match="no study_instance_uid"):
        check_dataset_file(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
