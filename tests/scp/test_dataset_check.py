"""The pre-acknowledgement dataset check on real sample files and on broken copies of them."""

from __future__ import annotations

import os
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
from pydicom import dcmread

from scp.dataset_check import (
    MAX_SEQUENCE_DEPTH,
    DatasetLimits,
    DatasetSummary,
    InflateLimits,
    check_dataset_file,
)
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


# Hand-built Part 10 files, so that every header, length and delimiter sits where a test wants it.
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SOP_INSTANCE = "1.2.3.4.5.6"
UNDEFINED = 0xFFFFFFFF
LONG_VRS = {b"OB", b"OW", b"SQ", b"UN", b"UT"}


def _uid(text: str) -> bytes:
    raw = text.encode()
    return raw + b"\x00" * (len(raw) % 2)


def _el(tag: int, vr: bytes, value: bytes, implicit: bool = False, length: int | None = None) -> bytes:
    """One element; ``length`` overrides the declared length (UNDEFINED for undefined)."""
    declared = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<I", declared) + value
    if vr in LONG_VRS:
        return head + vr + b"\x00\x00" + struct.pack("<I", declared) + value
    return head + vr + struct.pack("<H", declared) + value


def _item(content: bytes, undefined: bool) -> bytes:
    if undefined:
        return (
            struct.pack("<HHI", 0xFFFE, 0xE000, UNDEFINED) + content + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        )
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


def _sq(tag: int, items: list[bytes], undefined: bool, implicit: bool = False) -> bytes:
    body = b"".join(items)
    if undefined:
        return _el(tag, b"SQ", body, implicit, length=UNDEFINED) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return _el(tag, b"SQ", body, implicit)


def _identity(implicit: bool = False, sop_instance: str = SOP_INSTANCE) -> bytes:
    return b"".join(
        _el(tag, b"UI", _uid(uid), implicit)
        for tag, uid in (
            (0x00080016, SOP_CLASS),
            (0x00080018, sop_instance),
            (0x0020000D, "1.2.3.4"),
            (0x0020000E, "1.2.3.4.5"),
        )
    )


def _part10(dataset: bytes, transfer_syntax: str = EXPLICIT_LE) -> bytes:
    meta = _el(0x00020001, b"OB", b"\x00\x01") + _el(0x00020010, b"UI", _uid(transfer_syntax))
    group_length = _el(0x00020000, b"UL", struct.pack("<I", len(meta)))
    return b"\x00" * 128 + b"DICM" + group_length + meta + dataset


def _nested(implicit: bool) -> bytes:
    """Undefined-length sequences inside undefined-length items, inside defined-length ones."""
    leaf = _el(0x00081150, b"UI", _uid("1.2.3"), implicit) + _el(0x00081155, b"UI", _uid("1.2.4"), implicit)
    inner = _sq(0x00081199, [_item(leaf, undefined=True), _item(leaf, undefined=False)], True, implicit)
    middle = _sq(0x00081115, [_item(inner, undefined=True)], True, implicit)
    outer = _sq(
        0x00081200, [_item(middle + leaf, undefined=False), _item(b"", undefined=True)], False, implicit
    )
    return _sq(0x00400275, [_item(middle, undefined=True), _item(outer, undefined=False)], True, implicit)


def _check(tmp_path: Path, data: bytes) -> DatasetSummary:
    path = tmp_path / "built.dcm"
    path.write_bytes(data)
    return check_dataset_file(path, SOP_CLASS, SOP_INSTANCE)


@pytest.mark.parametrize("size", [0, 1, 100, 131, 132])
def test_empty_and_tiny_files_cannot_be_understood(tmp_path: Path, size: int) -> None:
    with pytest.raises(DatasetCorrupt, match="preamble"):
        _check(tmp_path, b"\x00" * size)


def test_a_file_cut_inside_the_file_meta_cannot_be_understood(tmp_path: Path) -> None:
    data = _part10(_identity())
    for cut in range(133, 132 + 12 + 14 + 8 + 18):  # every byte of the three meta elements
        with pytest.raises(DatasetCorrupt):
            _check(tmp_path, data[:cut])


@pytest.mark.parametrize("implicit", [False, True])
def test_nested_undefined_length_sequences_are_walked(tmp_path: Path, implicit: bool) -> None:
    transfer_syntax = IMPLICIT_LE if implicit else EXPLICIT_LE
    data = _part10(
        _identity(implicit) + _nested(implicit) + _el(0x00080060, b"CS", b"CT", implicit), transfer_syntax
    )
    summary = _check(tmp_path, data)
    assert summary.study_instance_uid == "1.2.3.4"
    assert summary.modality == "CT"


@pytest.mark.parametrize("implicit", [False, True])
def test_a_cut_anywhere_in_nested_sequences_cannot_be_understood(tmp_path: Path, implicit: bool) -> None:
    transfer_syntax = IMPLICIT_LE if implicit else EXPLICIT_LE
    head = _part10(_identity(implicit), transfer_syntax)
    data = head + _nested(implicit)
    for cut in range(len(head) + 1, len(data)):  # inside headers, items, values and delimiters
        with pytest.raises(DatasetCorrupt):
            _check(tmp_path, data[:cut])


@pytest.mark.parametrize("keep", [1, 4, 6, 8, 10, 11])
def test_a_file_cut_inside_an_element_header_cannot_be_understood(tmp_path: Path, keep: int) -> None:
    tail = _el(0x00091010, b"OB", b"\x00" * 4)  # 12-byte header: tag, VR, reserved, 32-bit length
    with pytest.raises(DatasetCorrupt, match=r"runs past|truncated"):
        _check(tmp_path, _part10(_identity() + tail[:keep]))


def test_a_file_cut_inside_a_sequence_item_cannot_be_understood(tmp_path: Path) -> None:
    item = _item(_el(0x00081150, b"UI", _uid("1.2.3")), undefined=False)
    data = _part10(_identity() + _sq(0x00081115, [item], undefined=False))
    for cut in (1, 5, 9, 12):
        with pytest.raises(DatasetCorrupt):
            _check(tmp_path, data[:-cut])


def test_an_element_running_past_the_end_cannot_be_understood(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetCorrupt, match=r"\(0009,1010\) at byte \d+ declares 100 bytes but only 4 remain"
    ):
        _check(tmp_path, _part10(_identity() + _el(0x00091010, b"OB", b"\x00" * 4, length=100)))
    short = _el(0x00081150, b"UI", _uid("1.2.3"), length=40)  # runs past its item, not the file
    data = _part10(_identity() + _sq(0x00081115, [_item(short, undefined=False)], False) + b"\x00" * 64)
    with pytest.raises(DatasetCorrupt, match="declares 40 bytes"):
        _check(tmp_path, data)
    with pytest.raises(DatasetCorrupt, match="item at byte"):  # an item longer than its sequence
        _check(
            tmp_path, _part10(_identity() + _el(0x00081115, b"SQ", struct.pack("<HHI", 0xFFFE, 0xE000, 64)))
        )


def test_misplaced_delimiters_cannot_be_understood(tmp_path: Path) -> None:
    item_delimiter = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    sequence_delimiter = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    cases = {
        "inside a defined-length item": _sq(0x00081115, [_item(item_delimiter, undefined=False)], False),
        "in a defined-length sequence": _el(0x00081115, b"SQ", sequence_delimiter),
        "expected an item tag": _el(0x00081115, b"SQ", _el(0x00081150, b"UI", b"1.2.")),
        "unexpected delimiter": sequence_delimiter,
        "undefined length": _el(0x00081150, b"UT", b"", length=UNDEFINED),
        "invalid VR": _el(0x00081150, b"u\x01", b"1.2."),
    }
    # Upper-case but not a VR of PS3.5 6.2: DCMTK's storescp and Orthanc refuse it too.
    with pytest.raises(DatasetCorrupt, match="invalid VR b'ZZ'"):
        _check(tmp_path, _part10(_identity() + _el(0x00091010, b"ZZ", b"ab")))
    for message, tail in cases.items():
        with pytest.raises(DatasetCorrupt, match=message):
            _check(tmp_path, _part10(_identity() + tail))
    with pytest.raises(DatasetCorrupt, match="runs past"):  # undefined-length item never delimited
        _check(tmp_path, _part10(_identity() + _sq(0x00081115, [_item(b"", True)[:8]], True)[:-8]))


def _encapsulated(fragment_sizes: list[int]) -> bytes:
    fragments = b"".join(_item(b"\xff" * size, undefined=False) for size in [0, *fragment_sizes])
    return _el(0x7FE00010, b"OB", fragments, length=UNDEFINED) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def test_encapsulated_fragments_far_apart_are_counted(tmp_path: Path) -> None:
    sizes = [100, 20_000, 70_000, 4, 300_000, 16_384, 16_382]  # far headers are read, near ones mapped
    summary = _check(tmp_path, _part10(_identity() + _encapsulated(sizes), JPEG_BASELINE))
    assert summary.encapsulated
    assert summary.pixel_fragments == len(sizes) + 1


def test_encapsulated_pixel_data_cut_after_a_far_fragment_cannot_be_understood(tmp_path: Path) -> None:
    data = _part10(_identity() + _encapsulated([70_000, 70_000]), JPEG_BASELINE)
    for cut in (1, 4, 8, 12, 70_010):  # in the delimiter, the last fragment's header, or its value
        with pytest.raises(DatasetCorrupt, match=r"encapsulated pixel data|fragment"):
            _check(tmp_path, data[:-cut])
    unterminated = _part10(_identity() + _encapsulated([70_000])[:-8], JPEG_BASELINE)
    with pytest.raises(DatasetCorrupt, match="encapsulated pixel data at byte"):
        _check(tmp_path, unterminated)


def test_deflated_data_is_inflated_and_walked(tmp_path: Path) -> None:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    dataset = _identity() + _nested(implicit=False)
    deflated = compressor.compress(dataset) + compressor.flush()
    summary = _check(tmp_path, _part10(deflated, DEFLATED))
    assert summary.series_instance_uid == "1.2.3.4.5"
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    cut = compressor.compress(dataset[:-3]) + compressor.flush()
    with pytest.raises(DatasetCorrupt):
        _check(tmp_path, _part10(cut, DEFLATED))
    with pytest.raises(DatasetCorrupt, match="does not inflate"):
        _check(tmp_path, _part10(b"\xff" * 64, DEFLATED))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_the_file_is_unmapped_and_closed_on_success_and_on_error(tmp_path: Path) -> None:
    good = tmp_path / "good.dcm"
    good.write_bytes(_part10(_identity() + _encapsulated([70_000, 10]), JPEG_BASELINE))
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(good.read_bytes()[:-20])
    fds = len(os.listdir("/proc/self/fd"))
    check_dataset_file(good, SOP_CLASS, SOP_INSTANCE)
    with pytest.raises(DatasetCorrupt):
        check_dataset_file(bad, SOP_CLASS, SOP_INSTANCE)
    maps = Path("/proc/self/maps").read_text()
    assert str(good) not in maps and str(bad) not in maps
    assert len(os.listdir("/proc/self/fd")) == fds


DEFLATED_LE = "1.2.840.10008.1.2.1.99"


def deflate_bomb(path: Path, inflated_mib: int, sop_instance: str = SOP_INSTANCE) -> Path:
    """A Deflated Explicit VR Part 10 file whose dataset (identity, then an OB of zeros)
    inflates to about ``inflated_mib`` MiB from a few hundred KB on disk."""
    identity = _identity(sop_instance=sop_instance)
    zeros = inflated_mib << 20
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    with path.open("wb") as out:
        meta = (
            _el(0x00020001, b"OB", b"\x00\x01")
            + _el(0x00020002, b"UI", _uid(SOP_CLASS))
            + _el(0x00020003, b"UI", _uid(sop_instance))
            + _el(0x00020010, b"UI", _uid(DEFLATED_LE))
        )
        out.write(b"\x00" * 128 + b"DICM" + _el(0x00020000, b"UL", struct.pack("<I", len(meta))) + meta)
        out.write(deflater.compress(identity + struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, zeros)))
        for _ in range(inflated_mib):
            out.write(deflater.compress(chunk))
        out.write(deflater.flush())
    return path


def test_a_deflate_bomb_is_refused_in_constant_memory(tmp_path: Path) -> None:
    bomb = deflate_bomb(tmp_path / "bomb.dcm", 300)
    assert bomb.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(DatasetCorrupt, match="deflate bomb"):  # past 64 MiB at 1000:1
            check_dataset_file(bomb, SOP_CLASS, SOP_INSTANCE)
        with pytest.raises(DatasetCorrupt, match="inflates past 16 MiB"):
            check_dataset_file(bomb, SOP_CLASS, SOP_INSTANCE, InflateLimits(max_bytes=16 << 20))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak >> 20} MiB"
    assert list(tmp_path.iterdir()) == [bomb]  # the inflated scratch file is gone
    # Under the bounds, the same construction is an ordinary deflated instance.
    small = deflate_bomb(tmp_path / "small.dcm", 2)
    assert check_dataset_file(small, SOP_CLASS, SOP_INSTANCE).transfer_syntax_uid == DEFLATED_LE


def test_sequences_nested_past_the_bound_cannot_be_understood(tmp_path: Path) -> None:
    def nest(levels: int) -> bytes:
        inner = _el(0x00081150, b"UI", _uid("1.2.3"))
        for _ in range(levels):
            inner = _sq(0x00081199, [_item(inner, undefined=True)], True)
        return inner

    _check(tmp_path, _part10(_identity() + nest(MAX_SEQUENCE_DEPTH)))
    for levels in (MAX_SEQUENCE_DEPTH + 1, 2000):  # 2000: past Python's recursion limit
        with pytest.raises(DatasetCorrupt, match=f"nested past {MAX_SEQUENCE_DEPTH} levels"):
            _check(tmp_path, _part10(_identity() + nest(levels)))


def hostile_instance(path: Path, kind: str, sop_instance: str = SOP_INSTANCE) -> Path:
    """A Part 10 file (with the file meta a sender reads) built to be refused for ``kind``:
    "items" (10^6 empty items in one sequence, 8 MB), "fragments" (10^6 empty pixel data
    fragments, JPEG Baseline), "elements" (1,000,001 empty private elements), "nesting" (200
    levels of sequences) or "frames" (Number of Frames 10^9 over two bytes of pixel data)."""
    identity = _identity(sop_instance=sop_instance)
    if kind == "items":
        empty = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
        body = _el(0x00081115, b"SQ", empty * 1_000_000)
    elif kind == "fragments":
        empty = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
        body = _el(0x7FE00010, b"OB", empty * 1_000_001, length=UNDEFINED) + struct.pack(
            "<HHI", 0xFFFE, 0xE0DD, 0
        )
    elif kind == "elements":
        body = struct.pack("<HH2sH", 0x0009, 0x1010, b"LO", 0) * 1_000_001
    elif kind == "nesting":
        body = _el(0x00081150, b"UI", _uid("1.2.3"))
        for _ in range(200):
            body = _sq(0x00081199, [_item(body, undefined=True)], True)
    elif kind == "frames":
        body = (
            _el(0x00280002, b"US", struct.pack("<H", 1))
            + _el(0x00280008, b"IS", b"1000000000")
            + _el(0x00280010, b"US", struct.pack("<H", 1))
            + _el(0x00280011, b"US", struct.pack("<H", 1))
            + _el(0x00280100, b"US", struct.pack("<H", 8))
            + _el(0x7FE00010, b"OB", b"\x00\x00")
        )
    else:
        raise ValueError(f"kind must be items, fragments, elements, nesting or frames, got {kind!r}")
    meta = (
        _el(0x00020001, b"OB", b"\x00\x01")
        + _el(0x00020002, b"UI", _uid(SOP_CLASS))
        + _el(0x00020003, b"UI", _uid(sop_instance))
        + _el(0x00020010, b"UI", _uid(JPEG_BASELINE if kind == "fragments" else EXPLICIT_LE))
    )
    head = b"\x00" * 128 + b"DICM" + _el(0x00020000, b"UL", struct.pack("<I", len(meta))) + meta
    path.write_bytes(head + identity + body)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("items", "more than 200000 sequence items"),
        ("fragments", "more than 200000 sequence items, pixel data fragments included"),
        ("elements", "more than 100000 data elements"),  # the default, a million, below
        ("nesting", f"nested past {MAX_SEQUENCE_DEPTH} levels"),
        ("frames", "Number of Frames 1000000000 is past 100000"),
    ],
)
def test_hostile_counts_are_refused_in_constant_memory(tmp_path: Path, kind: str, message: str) -> None:
    hostile = hostile_instance(tmp_path / f"{kind}.dcm", kind)
    # Each element costs tracemalloc's bookkeeping: a tenth of the default keeps this test quick.
    bounds = DatasetLimits(max_elements=100_000) if kind == "elements" else DatasetLimits()
    tracemalloc.start()
    try:
        with pytest.raises(DatasetCorrupt, match=message):
            check_dataset_file(hostile, SOP_CLASS, SOP_INSTANCE, bounds=bounds)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"peak {peak >> 10} KiB"


def test_the_counts_are_configurable(tmp_path: Path) -> None:
    elements = hostile_instance(tmp_path / "elements.dcm", "elements")
    with pytest.raises(DatasetCorrupt, match=r"more than 1000000 data elements \(node.max_data_elements\)"):
        check_dataset_file(elements, SOP_CLASS, SOP_INSTANCE)
    items = hostile_instance(tmp_path / "items.dcm", "items")
    generous = DatasetLimits(max_sequence_items=1_000_000, max_elements=2_000_000)
    check_dataset_file(items, SOP_CLASS, SOP_INSTANCE, bounds=generous)  # a million items, walked
    few = _part10(_identity() + _sq(0x00081115, [_item(b"", False)] * 3, False))
    _check(tmp_path, few)
    path = tmp_path / "built.dcm"
    with pytest.raises(DatasetCorrupt, match="more than 2 sequence items"):
        check_dataset_file(path, SOP_CLASS, SOP_INSTANCE, bounds=DatasetLimits(max_sequence_items=2))
    with pytest.raises(DatasetCorrupt, match="more than 4 data elements"):  # 4 UIDs, 1 SQ, 0 in items
        check_dataset_file(path, SOP_CLASS, SOP_INSTANCE, bounds=DatasetLimits(max_elements=4))
    check_dataset_file(path, SOP_CLASS, SOP_INSTANCE, bounds=DatasetLimits(max_elements=5))


def test_pixel_data_fragments_count_as_items(tmp_path: Path) -> None:
    three = _part10(_identity() + _encapsulated([10, 10, 10]), JPEG_BASELINE)  # and the offset table
    path = tmp_path / "three.dcm"
    path.write_bytes(three)
    check_dataset_file(path, SOP_CLASS, SOP_INSTANCE, bounds=DatasetLimits(max_sequence_items=3))
    with pytest.raises(DatasetCorrupt, match="more than 2 sequence items, pixel data fragments included"):
        check_dataset_file(path, SOP_CLASS, SOP_INSTANCE, bounds=DatasetLimits(max_sequence_items=2))
    with_items = _part10(
        _identity() + _sq(0x00081115, [_item(b"", False)], False) + _encapsulated([10] * 3), JPEG_BASELINE
    )
    path.write_bytes(with_items)
    with pytest.raises(DatasetCorrupt, match="more than 3 sequence items"):  # one item, three fragments
        check_dataset_file(path, SOP_CLASS, SOP_INSTANCE, bounds=DatasetLimits(max_sequence_items=3))


def _frames(value: bytes, pixels: bytes) -> bytes:
    return (
        _el(0x00280002, b"US", struct.pack("<H", 1))
        + _el(0x00280008, b"IS", value)
        + _el(0x00280010, b"US", struct.pack("<H", 2))
        + _el(0x00280011, b"US", struct.pack("<H", 2))
        + _el(0x00280100, b"US", struct.pack("<H", 8))
        + pixels
    )


def test_number_of_frames_is_bounded_and_matches_the_pixel_data(tmp_path: Path) -> None:
    native = _el(0x7FE00010, b"OB", b"\x00" * 12)  # three 2 x 2 frames
    assert _check(tmp_path, _part10(_identity() + _frames(b"3 ", native))).number_of_frames == "3"
    with pytest.raises(DatasetMismatch, match="Number of Frames must be at least 1, got 0"):
        _check(tmp_path, _part10(_identity() + _frames(b"0 ", native)))
    with pytest.raises(DatasetMismatch, match="Number of Frames must be at least 1, got -4"):
        _check(tmp_path, _part10(_identity() + _frames(b"-4", native)))
    with pytest.raises(DatasetMismatch, match="need 16"):
        _check(tmp_path, _part10(_identity() + _frames(b"4 ", native)))
    # encapsulated: every frame has a fragment of its own (PS3.5 A.4)
    three = _encapsulated([10, 10, 10])
    _check(tmp_path, _part10(_identity() + _frames(b"3 ", three), JPEG_BASELINE))
    with pytest.raises(
        DatasetMismatch, match="Number of Frames is 4 but the encapsulated pixel data holds only 3"
    ):
        _check(tmp_path, _part10(_identity() + _frames(b"4 ", three), JPEG_BASELINE))
    with pytest.raises(DatasetCorrupt, match=r"Number of Frames 200001 is past 100000 \(node.max_frames\)"):
        _check(tmp_path, _part10(_identity() + _frames(b"200001", three), JPEG_BASELINE))
    # without pixel data a huge claim is still refused (the worker lists frames from the header)
    with pytest.raises(DatasetCorrupt, match="past 100000"):
        _check(tmp_path, _part10(_identity() + _el(0x00280008, b"IS", b"99999999")))
    assert _check(tmp_path, _part10(_identity() + _el(0x00280008, b"IS", b"x "))).number_of_frames == "x"
