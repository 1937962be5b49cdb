"""Errors raised by the storage layer.

::

    StorageError
    ├── StorageUnavailable      retryable: the disk is (nearly) full or the database is unreachable
    │   ├── DiskFull
    │   └── DatabaseUnavailable
    └── LeaseLost               not retryable by the holder: another worker owns the job now
"""


class StorageError(Exception):
    """Base of every storage failure."""


class StorageUnavailable(StorageError):
    """A resource the node needs is missing for now; the caller may retry later."""


class DiskFull(StorageUnavailable):
    """Free space under ``storage.root`` is below ``storage.min_free_mb`` or a write hit ENOSPC."""


class DatabaseUnavailable(StorageUnavailable):
    """The database did not answer or refused the connection."""


class LeaseLost(StorageError):
    """A guarded job update matched no row: the lease expired or the job changed hands."""
