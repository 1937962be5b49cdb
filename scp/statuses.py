"""DIMSE status codes the node answers with (PS3.4 Annex B.2.3, PS3.7 Annex C)."""

import enum


class StoreStatus(enum.IntEnum):
    SUCCESS = 0x0000
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000

    @property
    def is_success(self) -> bool:
        return self == StoreStatus.SUCCESS


def is_transient_failure(status: int) -> bool:
    """A failure to store that is worth sending again: the receiver was short of resources
    (0xA7xx) or failed in itself (0x0110, PS3.7 C.4.2.1.4), not the instance."""
    return status & 0xFF00 == StoreStatus.OUT_OF_RESOURCES or status == StoreStatus.PROCESSING_FAILURE
