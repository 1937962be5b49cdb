"""Just enough DIMSE for the C-STORE fast path (:mod:`scp.reactor`): read a C-STORE-RQ command
set, write the C-STORE-RSP and the P-DATA-TF PDU that carries it, walk a P-DATA-TF PDU's
presentation data values, and write the File Meta Information pynetdicom writes before a
received dataset (byte for byte: a file received either way hashes the same).

Command sets are Implicit VR Little Endian (PS3.7 6.3.1). Nothing here trusts a length the peer
wrote: every read is checked against the bytes actually held.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATASET = 0x0101
P_DATA_TF = 0x04
COMMAND_BIT = 0x01  # message control header: command (1) or dataset (0) fragment
LAST_BIT = 0x02  # message control header: the message's last fragment
MAX_COMMAND_BYTES = 64 * 1024  # a C-STORE-RQ is a few hundred bytes; anything longer goes upstream


class CodecError(ValueError):
    """Bytes that are not what the PDU or command set says they are."""


@dataclass(frozen=True)
class PDV:
    """One presentation data value item of a P-DATA-TF PDU."""

    context_id: int
    control: int
    data: memoryview

    @property
    def is_command(self) -> bool:
        return bool(self.control & COMMAND_BIT)

    @property
    def is_last(self) -> bool:
        return bool(self.control & LAST_BIT)


@dataclass(frozen=True)
class StoreRequest:
    """What the fast path needs of a C-STORE-RQ (PS3.7 9.3.1.1)."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str


def pdvs(pdu: bytes | bytearray | memoryview) -> Iterator[PDV]:
    """The items of a whole P-DATA-TF PDU (type, reserved, length, items)."""
    view = memoryview(pdu)
    if len(view) < 6 or view[0] != P_DATA_TF:
        raise CodecError("not a P-DATA-TF PDU")
    (length,) = struct.unpack_from(">L", view, 2)
    if length != len(view) - 6:
        raise CodecError(f"P-DATA-TF length {length} but {len(view) - 6} bytes held")
    offset = 6
    while offset < len(view):
        if offset + 6 > len(view):
            raise CodecError("truncated presentation data value item")
        (item_length,) = struct.unpack_from(">L", view, offset)
        end = offset + 4 + item_length
        if item_length < 2 or end > len(view):
            raise CodecError(f"presentation data value item length {item_length} is out of bounds")
        yield PDV(view[offset + 4], view[offset + 5], view[offset + 6 : end])
        offset = end


def command_elements(command: bytes | memoryview) -> dict[int, bytes]:
    """Element number -> value of an Implicit VR Little Endian group 0000 command set."""
    view = memoryview(command)
    elements: dict[int, bytes] = {}
    offset = 0
    while offset < len(view):
        if offset + 8 > len(view):
            raise CodecError("truncated command set element")
        group, element, length = struct.unpack_from("<HHL", view, offset)
        offset += 8
        if group != 0x0000:
            raise CodecError(f"command set element ({group:04X},{element:04X}) is not in group 0000")
        if length > len(view) - offset:
            raise CodecError(f"command set element (0000,{element:04X}) length {length} is out of bounds")
        if element in elements:
            raise CodecError(f"command set element (0000,{element:04X}) appears twice")
        elements[element] = bytes(view[offset : offset + length])
        offset += length
    return elements


def _us(elements: dict[int, bytes], element: int) -> int:
    value = elements.get(element)
    if value is None or len(value) != 2:
        raise CodecError(f"command set element (0000,{element:04X}) is not one US value")
    return int.from_bytes(value, "little")


def _ui(elements: dict[int, bytes], element: int) -> str:
    value = elements.get(element)
    if value is None:
        raise CodecError(f"command set element (0000,{element:04X}) is missing")
    try:
        return value.rstrip(b"\0 ").decode("ascii")
    except UnicodeDecodeError as exc:
        raise CodecError(f"command set element (0000,{element:04X}) is not ASCII") from exc


def store_request(command: bytes | memoryview) -> StoreRequest | None:
    """The C-STORE-RQ in ``command``, or None for any other message (or one without a data
    set): those go to pynetdicom. Raises CodecError on a command set that cannot be read."""
    elements = command_elements(command)
    if _us(elements, 0x0100) != C_STORE_RQ or _us(elements, 0x0800) == NO_DATASET:
        return None
    return StoreRequest(_us(elements, 0x0110), _ui(elements, 0x0002), _ui(elements, 0x1000))


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def store_response(request: StoreRequest, status: int, error_comment: str | None = None) -> bytes:
    """The C-STORE-RSP command set (PS3.7 9.3.1.2), elements in tag order, group length first.
    ``error_comment`` is cut to LO's 64 characters and kept to printable ASCII."""
    body = _element(0x0002, _uid(request.sop_class_uid))
    body += _element(0x0100, struct.pack("<H", C_STORE_RSP))
    body += _element(0x0120, struct.pack("<H", request.message_id))
    body += _element(0x0800, struct.pack("<H", NO_DATASET))
    body += _element(0x0900, struct.pack("<H", status))
    if error_comment:
        text = "".join(c if " " <= c <= "~" and c != "\\" else "?" for c in error_comment[:64])
        raw = text.encode("ascii")
        body += _element(0x0902, raw + b" " if len(raw) % 2 else raw)
    body += _element(0x1000, _uid(request.sop_instance_uid))
    return _element(0x0000, struct.pack("<L", len(body))) + body


def command_pdu(context_id: int, command: bytes, peer_max_pdu: int = 0) -> bytes:
    """The P-DATA-TF PDUs carrying ``command``, each no longer than the peer takes
    (``peer_max_pdu``, its Maximum Length Received; 0: no limit), one fragment per PDU."""
    room = len(command) if peer_max_pdu == 0 else max(1, peer_max_pdu - 6)
    pdus = []
    for start in range(0, max(len(command), 1), room):
        fragment = command[start : start + room]
        control = COMMAND_BIT | (LAST_BIT if start + room >= len(command) else 0)
        item = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
        pdus.append(struct.pack(">BBL", P_DATA_TF, 0, len(item)) + item)
    return b"".join(pdus)


def _meta_element(group_element: int, vr: bytes, value: bytes) -> bytes:
    tag = struct.pack("<HH", 0x0002, group_element)
    if vr == b"OB":
        return tag + vr + b"\0\0" + struct.pack("<L", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information group, as pynetdicom's chunked receive
    writes them (pydicom's ``write_file_meta_info`` of pynetdicom's ``create_file_meta``)."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    body = _meta_element(0x0001, b"OB", b"\x00\x01")
    body += _meta_element(0x0002, b"UI", _uid(sop_class_uid))
    body += _meta_element(0x0003, b"UI", _uid(sop_instance_uid))
    body += _meta_element(0x0010, b"UI", _uid(transfer_syntax_uid))
    body += _meta_element(0x0012, b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID))
    body += _meta_element(0x0013, b"SH", version + b" " if len(version) % 2 else version)
    return b"\0" * 128 + b"DICM" + _meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body
