"""Check that a received Part 10 file is a complete dataset before it is acknowledged.

A raw pynetdicom SCP acknowledges truncated or garbled data with 0x0000, and pydicom reads a
truncated file without complaint. This walker maps the file read-only and unpacks every
element header of the dataset (recursing into sequences, items and encapsulated pixel data),
stepping over the values by position without reading them, so it proves that every length fits,
costs well under a millisecond for a CT slice, and keeps memory flat for a 2 GB
instance: only the pages holding headers are touched, never the pixel data. A deflated dataset
is inflated into memory and walked the same way. It also collects the few attributes ingest
needs.

Reference: DICOM PS3.5 §7 (data elements), §7.5 (nesting), §A.4 (encapsulation).
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TypeAlias

from pydicom._dicom_dict import DicomDictionary

from scp.errors import DatasetCorrupt, DatasetMismatch
from storage.studies import HeaderIndex

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"
NATIVE_TRANSFER_SYNTAXES = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
    }
)

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITATION = 0xFFFEE00D
SEQUENCE_DELIMITATION = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
_SEQUENCE_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")

_TRANSFER_SYNTAX_UID = 0x00020010
_WANTED_STRINGS = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x0020000D: "study_instance_uid",
    0x0020000E: "series_instance_uid",
    0x00080060: "modality",
    0x00280008: "number_of_frames",
    0x00280004: "photometric_interpretation",
    # Indexed at ingest so slice choice needs no file reads (analysis.selection).
    0x00080008: "image_type",
    0x00200013: "instance_number",
    0x00200032: "image_position_patient",
    0x00200037: "image_orientation_patient",
    0x00280301: "burned_in_annotation",
    0x00180015: "body_part_examined",
    0x00185101: "view_position",
}
_WANTED_US = {
    0x00280002: "samples_per_pixel",
    0x00280010: "rows",
    0x00280011: "columns",
    0x00280100: "bits_allocated",
}


@dataclass
class DatasetSummary:
    """What ingest needs from a checked dataset."""

    transfer_syntax_uid: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    modality: str = ""
    number_of_frames: str = ""
    photometric_interpretation: str = ""
    image_type: str = ""
    instance_number: str = ""
    image_position_patient: str = ""
    image_orientation_patient: str = ""
    burned_in_annotation: str = ""
    body_part_examined: str = ""
    view_position: str = ""
    samples_per_pixel: int | None = None
    rows: int | None = None
    columns: int | None = None
    bits_allocated: int | None = None
    pixel_data_length: int | None = None
    pixel_fragments: int = 0
    encapsulated: bool = False

    def header_index(self) -> HeaderIndex:
        def text(value: str, limit: int) -> str | None:
            return value[:limit] if value else None

        return HeaderIndex(
            modality=text(self.modality, 16),
            image_type=text(self.image_type, 1024),
            instance_number=text(self.instance_number, 12),
            image_position_patient=text(self.image_position_patient, 1024),
            image_orientation_patient=text(self.image_orientation_patient, 1024),
            rows=self.rows,
            columns=self.columns,
            number_of_frames=text(self.number_of_frames, 12),
            photometric_interpretation=text(self.photometric_interpretation, 16),
            burned_in_annotation=text(self.burned_in_annotation, 3),
            body_part_examined=text(self.body_part_examined, 16),
            view_position=text(self.view_position, 16),
        )


_Buffer: TypeAlias = bytes | mmap.mmap
"""A whole file mapped read-only, or an inflated deflated dataset: walked by integer offset."""

# Explicit VR header layout by VR: 16-bit length, or two reserved bytes and a 32-bit length
# (PS3.5 §7.1.2), the latter also marking a sequence. Only the VRs of PS3.5 §6.2: an unknown one
# ('ZZ') makes the dataset unreadable for a strict reader, and DCMTK's storescp and Orthanc refuse
# it, so we do too.
_KNOWN_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV"
    b"".split()
)
_SHORT, _LONG, _LONG_SQ = 0, 1, 2
# Real datasets nest a few levels (an SR content tree perhaps a dozen); DCMTK's storescp and
# Orthanc read far deeper, but nothing we store needs more.
MAX_SEQUENCE_DEPTH = 64
_VR_LAYOUT = dict.fromkeys(_KNOWN_VRS, _SHORT)
_VR_LAYOUT.update((vr, _LONG) for vr in _LONG_VRS)
_VR_LAYOUT[b"SQ"] = _LONG_SQ
# Top-level tags whose value is summarised (the rest are only skipped)
_SUMMARISED = frozenset(_WANTED_STRINGS) | frozenset(_WANTED_US) | {PIXEL_DATA}
_LE_TAG_VR_LENGTH = struct.Struct("<HH2sH")
_LE_U32 = struct.Struct("<I")
_FAR = 16384  # fragment size past which the next header is pread, not paged in (measured)
_PREAMBLE_ERROR = "file has no DICOM preamble and 'DICM' prefix"


class _Walker:
    """Walk the element headers of a dataset in ``buf``, skipping values by position.

    Each method takes the position of its first header and returns the position just past what
    it walked; no value is copied except the few summarised attributes. Error messages are built
    only when raising, to keep the per-element path to one unpack and a few comparisons.
    """

    def __init__(
        self,
        buf: _Buffer,
        little_endian: bool,
        implicit: bool,
        fd: int | None = None,
        limits: DatasetLimits | None = None,
    ) -> None:
        self.buf = buf
        self.fd = fd  # the mapped file, None for an inflated dataset
        self.end = len(buf)
        self.implicit = implicit
        endian = "<" if little_endian else ">"
        # tag + 32-bit length: implicit VR element headers, item and fragment headers
        self._tag_length = struct.Struct(endian + "HHI").unpack_from
        # tag + VR + 16-bit length: explicit VR element headers (a long VR's 32-bit length
        # follows two reserved bytes and is read with _u32)
        self._tag_vr_length = struct.Struct(endian + "HH2sH").unpack_from
        self._u16 = struct.Struct(endian + "H").unpack_from
        self._u32 = struct.Struct(endian + "I").unpack_from
        self.summary = DatasetSummary()
        self.depth = 0
        self.limits = limits or DatasetLimits()
        self.elements = 0  # data elements at every level, counted as each dataset is left
        self.items = 0  # sequence items at every level

    def dataset(self, pos: int, limit: int, undefined: bool, top: bool) -> int:
        # Locals, not globals or attributes, on the per-element path.
        buf = self.buf
        implicit = self.implicit
        header = self._tag_length if implicit else self._tag_vr_length
        u32 = self._u32
        vr_layout = _VR_LAYOUT
        sequence_tags = _SEQUENCE_TAGS
        summarised = _SUMMARISED
        undefined_length = UNDEFINED_LENGTH
        vr: bytes | None = None
        is_sequence = False
        count = 0
        # Refused at the first element past the bound, not after walking them all: a file of
        # empty elements is 8 bytes each, ~1 us each to walk. (Elements of enclosing datasets
        # are added as each is left, so this budget can be generous; _counted is exact.)
        budget = self.limits.max_elements - self.elements
        while True:
            if pos + 8 > limit:
                if pos == limit and not undefined:
                    self._counted(count)
                    return pos
                raise DatasetCorrupt(f"element header at byte {pos} runs past the end of its data")
            if implicit:
                group, elem, length = header(buf, pos)
            else:
                group, elem, vr, length = header(buf, pos)
            tag = group << 16 | elem
            if group == 0xFFFE:
                if tag == ITEM_DELIMITATION:
                    if not undefined:
                        raise DatasetCorrupt(f"item delimiter at byte {pos} inside a defined-length item")
                    self._counted(count)
                    return pos + 8
                raise DatasetCorrupt(f"unexpected delimiter tag ({group:04X},{elem:04X}) at byte {pos}")
            value_start = pos + 8
            count += 1
            if count > budget:
                self._counted(count)  # raises
            if vr is None:
                is_sequence = tag in sequence_tags
            else:
                layout = vr_layout.get(vr)
                if layout:  # _LONG or _LONG_SQ
                    if pos + 12 > self.end:
                        raise DatasetCorrupt(f"element length at byte {pos + 6} is truncated")
                    (length,) = u32(buf, value_start)
                    value_start = pos + 12
                    is_sequence = layout == _LONG_SQ
                elif layout is None:
                    raise DatasetCorrupt(
                        f"element ({group:04X},{elem:04X}) at byte {pos} has an invalid VR {vr!r}"
                    )
                else:
                    is_sequence = False
            if length == undefined_length:
                if tag == PIXEL_DATA and top:
                    self.summary.encapsulated = True
                    self.summary.pixel_fragments, pos = self._fragments(value_start, limit)
                elif is_sequence or vr is None or vr == b"UN":
                    pos = self.sequence(value_start, limit, undefined=True)
                else:
                    raise DatasetCorrupt(f"element ({group:04X},{elem:04X}) VR {vr!r} has undefined length")
                continue
            value_end = value_start + length
            if value_end > limit:
                raise DatasetCorrupt(
                    f"element ({group:04X},{elem:04X}) at byte {pos} declares {length} bytes but "
                    f"only {max(limit - value_start, 0)} remain"
                )
            if is_sequence:
                self.sequence(value_start, value_end, undefined=False)
            elif top and tag in summarised:
                self._summarise(tag, value_start, value_end)
            pos = value_end

    def _counted(self, count: int) -> None:
        """Add the elements of a dataset just walked; refuse past the bound (each one costs a
        reader such as pydicom a few hundred bytes: ten million 8-byte elements, an 80 MB file,
        would cost the worker gigabytes)."""
        self.elements += count
        if self.elements > self.limits.max_elements:
            raise DatasetCorrupt(
                f"more than {self.limits.max_elements} data elements (node.max_data_elements)"
            )

    def _summarise(self, tag: int, start: int, end: int) -> None:
        name = _WANTED_STRINGS.get(tag)
        if name is not None:
            text = self.buf[start:end].decode("ascii", "replace").strip("\x00 ")
            setattr(self.summary, name, text)
        elif tag == PIXEL_DATA:
            self.summary.pixel_data_length = end - start
        elif end - start == 2:
            setattr(self.summary, _WANTED_US[tag], self._u16(self.buf, start)[0])

    def sequence(self, pos: int, limit: int, undefined: bool) -> int:
        # Nesting is recursion: bounded, so a hostile file gets 0xC000, not a RecursionError.
        self.depth += 1
        try:
            if self.depth > MAX_SEQUENCE_DEPTH:
                raise DatasetCorrupt(f"sequences nested past {MAX_SEQUENCE_DEPTH} levels at byte {pos}")
            return self._items(pos, limit, undefined)
        finally:
            self.depth -= 1

    def _items(self, pos: int, limit: int, undefined: bool) -> int:
        item_header = self._tag_length
        buf = self.buf
        while True:
            if pos == limit and not undefined:
                return pos
            if pos + 8 > limit:
                raise DatasetCorrupt(f"sequence item at byte {pos} runs past the end of its data")
            group, elem, length = item_header(buf, pos)
            tag = group << 16 | elem
            if tag == SEQUENCE_DELIMITATION:
                if not undefined:
                    raise DatasetCorrupt(f"sequence delimiter at byte {pos} in a defined-length sequence")
                return pos + 8
            if tag != ITEM:
                raise DatasetCorrupt(f"expected an item tag at byte {pos}, found ({group:04X},{elem:04X})")
            self.items += 1
            if self.items > self.limits.max_sequence_items:
                raise DatasetCorrupt(
                    f"more than {self.limits.max_sequence_items} sequence items (node.max_sequence_items)"
                )
            if length == UNDEFINED_LENGTH:
                pos = self.dataset(pos + 8, limit, undefined=True, top=False)
            elif pos + 8 + length > limit:
                raise DatasetCorrupt(f"item at byte {pos} declares {length} bytes past the end")
            else:
                pos = self.dataset(pos + 8, pos + 8 + length, undefined=False, top=False)

    def _fragments(self, pos: int, limit: int) -> tuple[int, int]:
        """Return the number of fragments (offset table included) and the position after the
        sequence delimiter.

        A header more than ``_FAR`` bytes past the previous one is read with ``os.pread`` when
        the file is at hand: touching it through the map would cost a page fault (several
        microseconds, and pages mapped for nothing) where one small read costs about one."""
        item_header = self._tag_length
        buf = self.buf
        fd = self.fd
        count = 0
        far = False
        budget = self.limits.max_sequence_items - self.items + 1  # the offset table is no fragment
        while True:
            if pos + 8 > limit:
                raise DatasetCorrupt(f"encapsulated pixel data at byte {pos} is truncated")
            if far and fd is not None:
                head = os.pread(fd, 8, pos)
                if len(head) < 8:  # the file shrank under us
                    raise DatasetCorrupt(f"encapsulated pixel data at byte {pos} is truncated")
                group, elem, length = item_header(head)
            else:
                group, elem, length = item_header(buf, pos)
            tag = group << 16 | elem
            if tag == SEQUENCE_DELIMITATION:
                self.items += max(count - 1, 0)  # the fragments; the offset table aside
                return count, pos + 8
            if tag != ITEM or length == UNDEFINED_LENGTH or pos + 8 + length > limit:
                raise DatasetCorrupt(f"pixel data fragment at byte {pos} is malformed or truncated")
            pos += 8 + length
            far = length >= _FAR
            count += 1
            if count > budget:
                raise DatasetCorrupt(
                    f"more than {self.limits.max_sequence_items} sequence items, pixel data fragments "
                    "included (node.max_sequence_items)"
                )


def _read_file_meta(buf: _Buffer) -> tuple[str, int]:
    """Return the transfer syntax and the offset where the dataset starts."""
    size = len(buf)
    if size < 132 or buf[128:132] != b"DICM":
        raise DatasetCorrupt(_PREAMBLE_ERROR)
    transfer_syntax = ""
    pos = 132
    while pos + 2 <= size and buf[pos] == 0x02 and buf[pos + 1] == 0x00:  # group 0002
        if pos + 8 > size:
            if pos + 4 > size:
                raise DatasetCorrupt(f"meta tag at byte {pos} is truncated")
            if pos + 6 > size:
                raise DatasetCorrupt(f"meta VR at byte {pos + 4} is truncated")
            raise DatasetCorrupt(f"meta length at byte {pos + 6} is truncated")
        group, elem, vr, length = _LE_TAG_VR_LENGTH.unpack_from(buf, pos)
        if vr in _LONG_VRS:
            if pos + 12 > size:
                raise DatasetCorrupt(f"meta length at byte {pos + 6} is truncated")
            (length,) = _LE_U32.unpack_from(buf, pos + 8)
            pos += 12
        else:
            pos += 8
        if pos + length > size:
            raise DatasetCorrupt(f"file meta value at byte {pos} is truncated")
        if (group << 16 | elem) == _TRANSFER_SYNTAX_UID:
            transfer_syntax = buf[pos : pos + length].decode("ascii", "replace").strip("\x00 ")
        pos += length
    if not transfer_syntax:
        raise DatasetCorrupt("file meta information has no Transfer Syntax UID")
    return transfer_syntax, pos


@dataclass(frozen=True)
class InflateLimits:
    """Bounds on inflating a Deflated Explicit VR dataset (PS3.5 A.5): a 1 MB instance can
    inflate to gigabytes. Past ``max_bytes``, or past ``max_ratio`` times the deflated size once
    more than ``ratio_floor_bytes`` came out, the instance is refused."""

    max_bytes: int = 4 << 30
    max_ratio: int = 100
    ratio_floor_bytes: int = 64 << 20


@dataclass(frozen=True)
class DatasetLimits:
    """Bounds on what one instance may hold, beyond what its size bounds (PS3.5 §7.5): the
    walker itself stays in constant memory whatever a file holds, but the worker reads headers
    with pydicom, which builds an object per item and per element, and lists per frame. Past a
    bound the instance gets 0xC000 with the reason. The defaults are far above real studies (an
    enhanced MR of 2000 frames holds about 20,000 items and 100,000 elements). Encapsulated pixel
    data fragments are items too (PS3.5 A.4): two million empty ones, a 16 MB file, cost pydicom
    25 s and 250 MB to read."""

    max_sequence_items: int = 200_000
    max_elements: int = 1_000_000
    max_frames: int = 100_000


INFLATE_CHUNK = 1 << 20


def _inflate(deflated: memoryview, into: BinaryIO, limits: InflateLimits) -> int:
    """Inflate ``deflated`` into the file ``into`` one chunk at a time (memory stays at a few
    chunks whatever the ratio); returns the inflated size."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    for offset in range(0, len(deflated), INFLATE_CHUNK):
        # A copy, not a slice: a slice left in a traceback would keep the map from closing.
        data = bytes(deflated[offset : offset + INFLATE_CHUNK])
        while data:
            try:
                out = inflater.decompress(data, INFLATE_CHUNK)
            except zlib.error as exc:
                raise DatasetCorrupt(f"deflated dataset does not inflate: {exc}") from None
            total += len(out)
            consumed = offset + INFLATE_CHUNK - len(inflater.unconsumed_tail)
            if total > limits.max_bytes:
                raise DatasetCorrupt(f"deflated dataset inflates past {limits.max_bytes >> 20} MiB")
            if total > limits.ratio_floor_bytes and total > limits.max_ratio * max(consumed, 1):
                raise DatasetCorrupt(
                    f"deflated dataset inflates more than {limits.max_ratio} times its size (a deflate bomb)"
                )
            into.write(out)
            data = inflater.unconsumed_tail
            if inflater.eof:
                break
        if inflater.eof:
            break
    if not inflater.eof:
        raise DatasetCorrupt("deflated dataset does not inflate: incomplete or truncated stream")
    return total


def _walk_inflated(
    mapped: mmap.mmap, start: int, scratch: Path, limits: InflateLimits, bounds: DatasetLimits
) -> _Walker:
    """Inflate the dataset after ``start`` into an unnamed file in ``scratch`` (same bounds as
    the received file's disk) and walk a map of it."""
    with tempfile.TemporaryFile(dir=scratch) as inflated, memoryview(mapped) as view, view[start:] as tail:
        size = _inflate(tail, inflated, limits)
        if size == 0:
            raise DatasetCorrupt("deflated dataset inflates to nothing")
        inflated.flush()
        with mmap.mmap(inflated.fileno(), 0, access=mmap.ACCESS_READ) as mapped_inflated:
            walker = _Walker(mapped_inflated, little_endian=True, implicit=False, limits=bounds)
            walker.dataset(0, walker.end, undefined=False, top=True)
            walker.buf = b""  # the map closes here; the summary holds copies
            return walker


def check_dataset_file(
    path: Path,
    expected_sop_class_uid: str,
    expected_sop_instance_uid: str,
    limits: InflateLimits = InflateLimits(),
    bounds: DatasetLimits = DatasetLimits(),
) -> DatasetSummary:
    """Walk the whole file; raise :class:`DatasetCorrupt` (0xC000) for data that cannot be
    parsed, is truncated or is past ``limits`` or ``bounds``, :class:`DatasetMismatch` (0xA900)
    for a parseable dataset that does not match the C-STORE request or its own pixel
    description.

    The file is mapped read-only and closed again before this returns or raises; only the
    pages holding element headers and summarised values are touched."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size < 132:  # an empty file cannot be mapped, a short one is no Part 10
            raise DatasetCorrupt(_PREAMBLE_ERROR)
        try:
            mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        except ValueError:  # emptied since fstat
            raise DatasetCorrupt(_PREAMBLE_ERROR) from None
        with mapped:
            transfer_syntax, start = _read_file_meta(mapped)
            if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
                walker = _walk_inflated(mapped, start, path.parent, limits, bounds)
            else:
                walker = _Walker(
                    mapped,
                    little_endian=transfer_syntax != EXPLICIT_VR_BIG_ENDIAN,
                    implicit=transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN,
                    fd=fd,
                    limits=bounds,
                )
                walker.dataset(start, walker.end, undefined=False, top=True)
    finally:
        os.close(fd)
    summary = walker.summary
    summary.transfer_syntax_uid = transfer_syntax
    _check_consistency(summary, expected_sop_class_uid, expected_sop_instance_uid, bounds)
    return summary


# Video (PS3.5 §8.2.5-8.2.8): all frames are one stream, over as few fragments as the encoder
# made, so fragments cannot be counted against frames.
_VIDEO_PREFIXES = ("1.2.840.10008.1.2.4.10",)


def _number_of_frames(s: DatasetSummary, bounds: DatasetLimits) -> int | None:
    """Number of Frames as a number (None when absent or, without pixel data, unreadable);
    refused past ``bounds.max_frames`` whether or not pixel data follows (the worker makes a
    list per frame of what the header says)."""
    if not s.number_of_frames:
        return None
    has_pixels = s.pixel_data_length is not None or s.encapsulated
    try:
        frames = int(s.number_of_frames)
    except ValueError:
        if has_pixels:
            raise DatasetMismatch(f"Number of Frames is not a number: {s.number_of_frames[:32]!r}") from None
        return None
    if frames > bounds.max_frames:
        raise DatasetCorrupt(f"Number of Frames {frames} is past {bounds.max_frames} (node.max_frames)")
    if frames < 1 and has_pixels:
        raise DatasetMismatch(f"Number of Frames must be at least 1, got {frames}")
    return frames


def _check_consistency(s: DatasetSummary, sop_class: str, sop_instance: str, bounds: DatasetLimits) -> None:
    if s.sop_class_uid != sop_class:
        raise DatasetMismatch(
            f"SOP Class UID in the dataset ({s.sop_class_uid or 'absent'}) differs from the "
            f"C-STORE request ({sop_class})"
        )
    if s.sop_instance_uid != sop_instance:
        raise DatasetMismatch(
            f"SOP Instance UID in the dataset ({s.sop_instance_uid or 'absent'}) differs from "
            f"the C-STORE request ({sop_instance})"
        )
    for name in ("study_instance_uid", "series_instance_uid"):
        if not getattr(s, name):
            raise DatasetMismatch(f"dataset has no {name}")
    native = s.transfer_syntax_uid in NATIVE_TRANSFER_SYNTAXES
    if s.encapsulated and native:
        raise DatasetMismatch(f"encapsulated pixel data in native transfer syntax {s.transfer_syntax_uid}")
    if s.encapsulated and s.pixel_fragments < 2:
        raise DatasetMismatch("encapsulated pixel data holds no fragment after the offset table")
    frames = _number_of_frames(s, bounds)
    video = s.transfer_syntax_uid.startswith(_VIDEO_PREFIXES)
    if s.encapsulated and frames is not None and not video and s.pixel_fragments - 1 < frames:
        # PS3.5 A.4: each frame is in one or more fragments of its own
        raise DatasetMismatch(
            f"Number of Frames is {frames} but the encapsulated pixel data holds only "
            f"{s.pixel_fragments - 1} fragment(s)"
        )
    if s.pixel_data_length is None:
        return
    if not native:
        raise DatasetMismatch(f"native pixel data in compressed transfer syntax {s.transfer_syntax_uid}")
    missing = [n for n in ("rows", "columns", "bits_allocated") if getattr(s, n) is None]
    if missing:
        raise DatasetMismatch(f"pixel data without {', '.join(missing)}")
    frames = frames or 1
    rows, columns, bits_allocated = s.rows or 0, s.columns or 0, s.bits_allocated or 0
    samples = s.samples_per_pixel or 1
    if s.photometric_interpretation == "YBR_FULL_422":
        samples = 2  # PS3.3 C.7.6.3.1.2: two samples' worth per pixel after 4:2:2 subsampling
    bits = rows * columns * max(frames, 1) * samples * bits_allocated
    expected = (bits + 7) // 8
    if s.pixel_data_length < expected:
        raise DatasetMismatch(
            f"pixel data is {s.pixel_data_length} bytes but Rows {rows} x Columns {columns} x "
            f"{frames} frame(s) x {samples} sample(s) x {bits_allocated} bits need {expected}"
        )
