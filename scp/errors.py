"""Errors raised by the DICOM networking layer.

::

    ScpError
    ├── DatasetRejected         the peer sent something we will not keep (not retryable as is)
    │   ├── DatasetCorrupt      cannot be parsed or is truncated          -> 0xC000
    │   └── DatasetMismatch     parses, but does not match the request    -> 0xA900
    └── PeerError               a remote AE refused, failed or could not be reached
"""


class ScpError(Exception):
    """Base of every DICOM networking failure."""


class DatasetRejected(ScpError):
    """A received dataset is refused; the subclass decides the DIMSE status."""


class DatasetCorrupt(DatasetRejected):
    """Truncated or garbled data: C-STORE answers 0xC000 (cannot understand)."""


class DatasetMismatch(DatasetRejected):
    """A dataset that does not match its SOP class or the request: 0xA900."""


class PeerError(ScpError):
    """A peer could not be reached, refused the association, or answered a failure status."""
