"""The C-STORE fast path's DIMSE codec (scp/dimse_codec.py), against pydicom and pynetdicom's own
encoders and decoders."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu import P_DATA_TF

from scp import dimse_codec
from scp.dimse_codec import CodecError, StoreRequest

CT = "1.2.840.10008.5.1.4.1.1.2"


def _pynetdicom_command(primitive: C_STORE | C_ECHO) -> bytes:
    """The command set pynetdicom's SCU sends for ``primitive``."""
    message: DIMSEMessage = C_STORE_RQ() if isinstance(primitive, C_STORE) else C_ECHO_RQ()
    message.primitive_to_message(primitive)
    p_data = next(iter(message.encode_msg(1, 0)))  # the command comes first
    ((_context, data),) = p_data.presentation_data_value_list
    assert data[0] == 0x03  # command, last fragment
    return bytes(data[1:])


@pytest.mark.parametrize("uid", ["1.2.3.44", "1.2.3.4", "2.25." + "9" * 59])
def test_the_file_meta_is_pynetdicoms_byte_for_byte(uid: str) -> None:
    expected = BytesIO()
    expected.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(
        DicomFileLike(expected),
        create_file_meta(
            sop_class_uid=UID(CT), sop_instance_uid=UID(uid), transfer_syntax=UID("1.2.840.10008.1.2.1")
        ),
    )
    assert dimse_codec.file_meta(CT, uid, "1.2.840.10008.1.2.1") == expected.getvalue()


def test_a_c_store_request_from_pynetdicom_is_read() -> None:
    primitive = C_STORE()
    primitive.MessageID = 7
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.45"
    primitive.Priority = 2
    primitive.MoveOriginatorApplicationEntityTitle = "MOVER"
    primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = BytesIO(b"\0\0")  # any data set: the command says one follows
    assert dimse_codec.store_request(_pynetdicom_command(primitive)) == StoreRequest(7, CT, "1.2.3.45")


def test_any_other_message_is_left_to_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assert dimse_codec.store_request(_pynetdicom_command(echo)) is None


@pytest.mark.parametrize(
    "command",
    [
        struct.pack("<HHL", 0, 0x0100, 2),  # a length past the end
        struct.pack("<HHL", 8, 0x0100, 2) + b"\x01\x00",  # not group 0000
        struct.pack("<HHL", 0, 0x0100, 2) + b"\x01\x00" + struct.pack("<HHL", 0, 0x0100, 2) + b"\x01\x00",
        struct.pack("<HHL", 0, 0x0100, 4) + b"\x01\x00\x00\x00",  # US of four bytes
        b"\x00\x00",
    ],
)
def test_a_malformed_command_is_refused(command: bytes) -> None:
    with pytest.raises(CodecError):
        dimse_codec.store_request(command)


@pytest.mark.parametrize("comment", [None, "", "disk full", "x" * 100, "naïve\\path\nnext"])
def test_the_response_decodes_as_pynetdicom_decodes_it(comment: str | None) -> None:
    request = StoreRequest(65535, CT, "1.2.3.456")
    pdu_bytes = dimse_codec.command_pdu(5, dimse_codec.store_response(request, 0xA700, comment))
    pdu = P_DATA_TF()
    pdu.decode(pdu_bytes)
    message = DIMSEMessage()
    assert message.decode_msg(pdu.to_primitive())
    response = message.message_to_primitive()
    assert isinstance(response, C_STORE)
    assert message.context_id == 5
    assert message.command_set.CommandGroupLength == len(message.encoded_command_set.getvalue()) - 12
    assert response.MessageIDBeingRespondedTo == 65535
    assert response.Status == 0xA700
    assert response.AffectedSOPClassUID == CT
    assert response.AffectedSOPInstanceUID == "1.2.3.456"
    error_comment = message.command_set.get("ErrorComment")
    if comment:
        assert error_comment is not None and len(error_comment) <= 64
        assert error_comment.isascii() and "\\" not in error_comment and "\n" not in error_comment
        assert error_comment.startswith(comment[:3].replace("ï", "?"))
    else:
        assert error_comment is None


def test_the_items_of_a_p_data_pdu_are_walked_in_bounds() -> None:
    pdu = dimse_codec.command_pdu(3, b"abcd")
    ((item),) = list(dimse_codec.pdvs(pdu))
    assert (item.context_id, item.is_command, item.is_last, bytes(item.data)) == (3, True, True, b"abcd")
    with pytest.raises(CodecError):
        list(dimse_codec.pdvs(pdu[:-1]))  # the PDU's length says more than it holds
    lying_item = pdu[:6] + struct.pack(">L", 1000) + pdu[10:]
    with pytest.raises(CodecError):
        list(dimse_codec.pdvs(lying_item))
