"""Errors raised by the storage layer.

::

    StorageError
    ├── StorageUnavailable      retryable: the disk is (nearly) full or the database is unreachable
    │   ├── DiskFull
    │   └── DatabaseUnavailable
    ├── LeaseLost               not retryable by the holder: another worker owns the job now
    └── DatabaseNotUsable       at start: the URL is malformed, its driver is not installed, or
                                the server cannot be reached; the message names the fix
"""


class StorageError(Exception):
    """Base of every storage failure."""


class StorageUnavailable(StorageError):
    """A resource the node needs is missing for now; the caller may retry later."""


class DiskFull(StorageUnavailable):
    """Free space under ``storage.root`` is below ``storage.min_free_mb`` or a write hit ENOSPC."""


class DatabaseUnavailable(StorageUnavailable):
    """The database did not answer or refused the connection."""


class DatabaseNotUsable(StorageError):
    """``storage.database_url`` cannot be opened; the message is one line and has no password."""


class LeaseLost(StorageError):
    """A guarded job update matched no row: the lease expired or the job changed hands."""
