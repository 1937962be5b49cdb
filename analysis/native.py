"""The stored values of an uncompressed single-frame grayscale slice straight from its file bytes,
without pydicom: the fast path of a slab's reads (:mod:`analysis.volume`).

pydicom builds a Dataset of every element of every slice; a slab needs only the pixel bytes and
the few attributes that say how to read them and the Modality LUT. This walks the top-level
element headers of a little-endian (implicit or explicit VR) dataset by position, stepping over
values and nested sequences without reading them, keeps those few attributes, and returns the
pixel data as a numpy view of the bytes read. Anything it does not handle exactly as pydicom
would (another transfer syntax, a multi-frame, colour, a Modality LUT Sequence, an odd length)
returns None so the caller takes pydicom's path. Stored files have passed ingest's complete
walk (scp.dataset_check), so the odd cases are rare, not hostile; bounds are checked anyway.

Reference: DICOM PS3.5 §7.1 (element encoding), §7.5 (sequences), §8.1.1 (pixel data), §8.2
(native format); PS3.3 C.7.6.3 (Image Pixel module), C.11.1 (Modality LUT).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_DELIMITATION = 0xFFFEE00D
_SEQUENCE_DELIMITATION = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}
)
_MAX_DEPTH = 32

# Top-level attributes read (US values; IS/DS as text); any other tag is stepped over.
_US = {
    0x00280002: "samples",
    0x00280010: "rows",
    0x00280011: "columns",
    0x00280100: "allocated",
    0x00280101: "stored",
    0x00280103: "representation",
}
_TEXT = {0x00281052: "intercept", 0x00281053: "slope"}
# Present at the top level: not a plain single-frame slice with a linear Modality LUT.
_REFUSED = frozenset(
    {
        0x00280008,  # Number of Frames: a multi-frame (frames and per-frame groups: pydicom)
        0x00283000,  # Modality LUT Sequence
        0x52009229,  # Shared Functional Groups Sequence
        0x52009230,  # Per-Frame Functional Groups Sequence
        0x00280009,  # Frame Increment Pointer
    }
)

Peek = Callable[[int, int], bytes]  # (offset, count): bytes of the file at offset
_TAG_LENGTH = struct.Struct("<HHI").unpack_from
_TAG_VR_LENGTH = struct.Struct("<HH2sH").unpack_from
_U32 = struct.Struct("<I").unpack_from
_U16 = struct.Struct("<H").unpack_from


class _Unsupported(Exception):
    """Not a case this reader handles exactly: the caller uses pydicom."""


class _NeedMore(Exception):
    """The header runs past the bytes read so far."""


@dataclass(frozen=True)
class NativeSlice:
    """A slice's stored values, masked to Bits Stored, and its linear rescale."""

    pixels: NDArray[np.generic]
    slope: float
    intercept: float


@dataclass(frozen=True)
class NativeHeader:
    """Where a slice's stored values are in its file and how to read them: ``rows`` x ``columns``
    of ``dtype`` at byte ``offset``, masked to ``mask`` (Bits Stored) when it is not None, and the
    Modality LUT's linear rescale exactly as :func:`analysis.volume._rescale` reads it."""

    offset: int
    rows: int
    columns: int
    dtype: np.dtype[Any]
    mask: int | None
    slope: float
    intercept: float


def _short(final: bool) -> Exception:
    """What running out of bytes means: the file is cut short (final) or more must be read."""
    return _Unsupported() if final else _NeedMore()


def _skip_sequence(buf: bytes, pos: int, limit: int, implicit: bool, depth: int, final: bool) -> int:
    """Past an undefined-length sequence whose first item header is at ``pos``."""
    if depth > _MAX_DEPTH:
        raise _Unsupported
    while True:
        if pos + 8 > limit:
            raise _short(final)
        group, elem, length = _TAG_LENGTH(buf, pos)
        tag = group << 16 | elem
        pos += 8
        if tag == _SEQUENCE_DELIMITATION:
            return pos
        if tag != _ITEM:
            raise _Unsupported
        if length == _UNDEFINED:
            pos = _skip_item(buf, pos, limit, implicit, depth + 1, final)
        else:
            pos += length


def _skip_item(buf: bytes, pos: int, limit: int, implicit: bool, depth: int, final: bool) -> int:
    """Past the elements of an undefined-length item and its delimiter."""
    while True:
        if pos + 12 > limit:
            raise _short(final)
        if buf[pos : pos + 4] == b"\xfe\xff\x0d\xe0":  # (FFFE,E00D) item delimitation: no VR
            return pos + 8
        group, _, vr, length, value = _element(buf, pos, implicit)
        if group == 0xFFFE:
            raise _Unsupported
        if length == _UNDEFINED:
            if vr is None or vr == b"SQ":
                pos = _skip_sequence(buf, value, limit, implicit, depth + 1, final)
            elif vr == b"UN":  # PS3.5 6.2.2: an undefined-length UN holds implicit VR items
                pos = _skip_sequence(buf, value, limit, True, depth + 1, final)
            else:
                raise _Unsupported
        else:
            pos = value + length


def _meta(buf: bytes, final: bool) -> tuple[str, int]:
    """The transfer syntax and the offset of the dataset after the file meta (always explicit
    VR little endian, PS3.10 7.1)."""
    if len(buf) < 132:
        raise _short(final)
    if buf[128:132] != b"DICM":
        raise _Unsupported
    pos, syntax = 132, ""
    while True:
        if pos + 12 > len(buf):
            raise _short(final)
        if buf[pos : pos + 2] != b"\x02\x00":
            return syntax, pos
        _, elem, vr, length = _TAG_VR_LENGTH(buf, pos)
        pos += 8
        if vr in _LONG_VRS:
            (length,) = _U32(buf, pos)
            pos += 4
        if length == _UNDEFINED:
            raise _Unsupported
        if pos + length > len(buf):
            raise _short(final)
        if elem == 0x0010:
            syntax = buf[pos : pos + length].decode("ascii", "replace").strip("\x00 ")
        pos += length


def _number(text: bytes | None, default: float) -> float:
    """A DS value as ``float(ds.get(keyword, default) or default)`` reads it."""
    if text is None:
        return default
    stripped = text.decode("ascii").strip("\x00 ")
    if not stripped:
        return default
    if "\\" in stripped:  # multi-valued where one value is defined: pydicom's path decides
        raise _Unsupported
    value = float(stripped)
    return value if value else default


HEADER_CHUNK = 8192  # bytes read for the header first; more when it is longer


def read_header(descriptor: int) -> NativeHeader | None:
    """The header of the file open as ``descriptor`` (read by position, from its start): None for
    anything but an uncompressed little-endian single-frame grayscale image with 8, 16 or 32
    bits allocated, whose pixels the caller then reads with pydicom. ``OSError`` propagates."""
    size = os.fstat(descriptor).st_size

    def peek(offset: int, count: int) -> bytes:
        return os.pread(descriptor, count, offset)

    buf = os.pread(descriptor, HEADER_CHUNK, 0)
    final = len(buf) < HEADER_CHUNK
    while True:
        try:
            return _parse(buf, final, size, peek)
        except _NeedMore:
            wanted = len(buf)  # doubling: a long header costs a few reads, not many
            more = os.pread(descriptor, wanted, len(buf))
            final = len(more) < wanted
            buf += more
        except (_Unsupported, struct.error, ValueError, UnicodeDecodeError):
            return None


def read_pixels(descriptor: int, header: NativeHeader, out: NDArray[Any] | None = None) -> NDArray[Any]:
    """The stored values the header describes, read into ``out`` (a (rows, columns) array of the
    header's dtype, reused by the caller so no fresh memory is touched per slice) or a new array.
    ``OSError`` when the file is shorter than its header says."""
    shape = (header.rows, header.columns)
    if out is None:
        out = np.empty(shape, dtype=header.dtype)
    elif out.shape != shape or out.dtype != header.dtype or not out.flags.c_contiguous:
        raise ValueError(f'Argument "out" must be a contiguous {shape} {header.dtype} array')
    view = memoryview(out).cast("B")  # type: ignore[arg-type]
    got = 0
    while got < out.nbytes:
        count = os.preadv(descriptor, [view[got:]], header.offset + got)
        if not count:
            raise OSError(f"pixel data ends after {got} of {out.nbytes} bytes")
        got += count
    if header.mask is not None:
        np.bitwise_and(out, header.dtype.type(header.mask), out=out)
    return out


def read_native(path: Path) -> NativeSlice | None:
    """The slice's stored values and linear rescale in a new array, or None when
    :func:`read_header` says pydicom must read it."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        header = read_header(descriptor)
        if header is None:
            return None
        return NativeSlice(read_pixels(descriptor, header), header.slope, header.intercept)
    finally:
        os.close(descriptor)


def _element(buf: bytes, pos: int, implicit: bool) -> tuple[int, int, bytes | None, int, int]:
    """(group, element, VR or None, value length, value position) of the element at ``pos``."""
    if implicit:
        group, elem, length = _TAG_LENGTH(buf, pos)
        return group, elem, None, length, pos + 8
    group, elem, vr, length = _TAG_VR_LENGTH(buf, pos)
    if vr in _LONG_VRS:
        (length,) = _U32(buf, pos + 8)
        return group, elem, vr, length, pos + 12
    return group, elem, vr, length, pos + 8


def _walk(
    buf: bytes, pos: int, implicit: bool, final: bool, stop_group: int, found: dict[int, bytes]
) -> tuple[int, int, int]:
    """Walk top-level elements from ``pos`` until the first of a group past ``stop_group`` or the
    Pixel Data, keeping the values of group 0028 in ``found`` (raising :class:`_Unsupported`
    for a tag that makes the image one this reader leaves to pydicom). Returns (position of the
    element it stopped at, its tag, its value length). The loop is written out, with locals,
    because it runs once per element of every slice: about half a microsecond each."""
    limit = len(buf)
    tag_length, tag_vr_length, u32, long_vrs = _TAG_LENGTH, _TAG_VR_LENGTH, _U32, _LONG_VRS
    vr: bytes | None = None
    while True:
        if pos + 12 > limit:
            raise _short(final)
        if implicit:
            group, elem, length = tag_length(buf, pos)
            value = pos + 8
        else:
            group, elem, vr, length = tag_vr_length(buf, pos)
            if vr in long_vrs:
                (length,) = u32(buf, pos + 8)
                value = pos + 12
            else:
                value = pos + 8
        if group >= 0x0028:
            tag = group << 16 | elem
            if group > stop_group or tag == _PIXEL_DATA or group == 0xFFFE:
                return pos, tag, length
            if tag in _REFUSED:
                raise _Unsupported
            if group == 0x0028 and (tag in _US or tag in _TEXT):
                if value + length > limit:
                    raise _short(final)
                found[tag] = buf[value : value + length]
        if length == _UNDEFINED:
            if vr is None or vr == b"SQ":
                pos = _skip_sequence(buf, value, limit, implicit, 1, final)
            elif vr == b"UN":  # PS3.5 6.2.2: an undefined-length UN holds implicit VR items
                pos = _skip_sequence(buf, value, limit, True, 1, final)
            else:
                raise _Unsupported
        else:
            pos = value + length


def _parse(buf: bytes, final: bool, size: int, peek: Peek) -> NativeHeader | None:
    """The header in ``buf`` (the file's first bytes, all of them when ``final``; ``size``: the
    file's). Elements are walked up to group 0028, which holds all that is read; the Pixel Data
    is then looked for at the end of the file, where it is when nothing follows it (its element
    header just before the last rows x columns values, with exactly that length), and otherwise
    walked to. A multi-frame (Number of Frames, in group 0028) is refused before, so the
    functional groups past it (5200) never hold this image's rescale."""
    syntax, pos = _meta(buf, final)
    if syntax not in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        return None
    implicit = syntax == IMPLICIT_VR_LITTLE_ENDIAN
    found: dict[int, bytes] = {}
    pos, tag, length = _walk(buf, pos, implicit, final, 0x0028, found)
    numbers: dict[str, int] = {}
    for key, name in _US.items():
        if key in found:
            if len(found[key]) != 2:
                return None
            (numbers[name],) = _U16(found[key], 0)
    rows, columns = numbers.get("rows", 0), numbers.get("columns", 0)
    allocated, stored = numbers.get("allocated", 0), numbers.get("stored", 0)
    signed = numbers.get("representation", 0) == 1
    if (
        numbers.get("samples", 1) != 1
        or rows < 1
        or columns < 1
        or allocated not in (8, 16, 32)
        or not 0 < stored <= allocated
        or (signed and stored != allocated)  # sign extension from Bits Stored: pydicom's
    ):
        return None
    expected = rows * columns * allocated // 8
    padded = expected + (expected & 1)
    if tag == _PIXEL_DATA:
        pixel_start, pixel_length = pos + (8 if implicit else 12), length
    else:
        pixel_start, pixel_length = _pixels_at_the_end(buf, pos, implicit, final, size, padded, peek)
    if pixel_length == _UNDEFINED or pixel_length < expected or pixel_start + expected > size:
        return None  # encapsulated (compressed), or shorter than the image
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    return NativeHeader(
        pixel_start,
        rows,
        columns,
        dtype,
        None if signed or stored == allocated else (1 << stored) - 1,
        _number(found.get(0x00281053), 1.0),
        _number(found.get(0x00281052), 0.0),
    )


def _pixels_at_the_end(
    buf: bytes, pos: int, implicit: bool, final: bool, size: int, padded: int, peek: Peek
) -> tuple[int, int]:
    """(value position, length) of the top-level Pixel Data, from the end of the file when its
    header is where a last element of ``padded`` bytes would have it, else by walking on."""
    header_size = 8 if implicit else 12
    start = size - padded - header_size
    if start >= pos:
        head = (
            buf[start : start + header_size] if start + header_size <= len(buf) else peek(start, header_size)
        )
        if len(head) == header_size:
            group, elem, vr, length, _ = _element(head, 0, implicit)
            if (group, elem, length) == (0x7FE0, 0x0010, padded) and vr in (None, b"OW", b"OB"):
                return start + header_size, length
    found: dict[int, bytes] = {}
    pos, tag, length = _walk(buf, pos, implicit, final, 0xFFFD, found)
    if tag != _PIXEL_DATA:
        raise _Unsupported
    return pos + header_size, length
