"""Instance files: written once, fsynced, renamed into place atomically.

Layout under ``storage.root``::

    tmp/                         partial files (received data, not yet durable); purged at start
    instances/<study>/<series>/<sop>.<sha256[:16]>.dcm

The content hash in the name means a replacement (same SOP Instance UID, different bytes) is a
new file: the old file stays until the database row points at the new one, so a crash at any
moment leaves a complete, referenced file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from storage.errors import DiskFull

# PS3.5 §9.1: digits and dots, no empty component, no leading zero in a component (except "0")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
HASH_CHUNK_BYTES = 1 << 20


def is_safe_uid(value: str) -> bool:
    """A UID conformant to PS3.5 §9.1 (and so safe as a path component): at most 64 characters,
    digits and dots, no leading zeros, nothing after it (``fullmatch``: ``$`` would let a
    trailing newline through)."""
    return len(value) <= 64 and _UID.fullmatch(value) is not None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class InstanceStore:
    root: Path

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def instances_dir(self) -> Path:
        return self.root / "instances"

    def prepare(self, purge: bool = True) -> None:
        """Create the folders and (``purge``) delete partial files a previous run left behind.
        Only while nothing receives: a purge would delete another receiver's file in flight."""
        for folder in (self.tmp_dir, self.instances_dir):
            folder.mkdir(parents=True, exist_ok=True)
        if not purge:
            return
        for leftover in self.tmp_dir.iterdir():
            if leftover.is_file():
                leftover.unlink(missing_ok=True)

    def check_free_space(self, min_free_mb: int) -> None:
        free_mb = shutil.disk_usage(self.root).free // (1 << 20)
        if free_mb < min_free_mb:
            raise DiskFull(
                f"free space under {str(self.root)!r} is {free_mb} MB, below storage.min_free_mb "
                f"= {min_free_mb}"
            )

    def relative_path(self, study: str, series: str, sop: str, sha256: str) -> str:
        for name, uid in (("study", study), ("series", series), ("sop", sop)):
            if not is_safe_uid(uid):
                raise ValueError(f"Argument {name!r} must be a DICOM UID, got {uid!r}")
        return f"instances/{study}/{series}/{sop}.{sha256[:16]}.dcm"

    def absolute(self, relative: str) -> Path:
        return self.root / relative

    def sync_bytes(self, received: Path) -> None:
        """fsync a received file's bytes (:class:`DiskFull` when the disk is full)."""
        with self._enospc_as_disk_full():
            fsync_path(received)

    def install(
        self, received: Path, relative: str, sync_folder: bool = True, bytes_synced: bool = False
    ) -> Path:
        """Make ``received`` durable at ``relative``: fsync the bytes, rename into place, fsync
        the folder (and any folder created on the way). Idempotent for the same content.
        ``sync_folder=False``: the caller fsyncs the file's folder itself before relying on the
        name (group commit syncs each folder once per batch). ``bytes_synced``: the caller has
        fsynced the bytes already (:meth:`sync_bytes`)."""
        final = self.root / relative
        with self._enospc_as_disk_full():
            if not bytes_synced:
                fsync_path(received)
            self._make_dirs_durably(final.parent)
            os.replace(received, final)
            if sync_folder:
                fsync_path(final.parent)
        return final

    def link_new(self, received: Path, relative: str) -> bool | None:
        """Give ``received`` the name ``relative`` without waiting for its bytes' fsync, only
        if no file has that name yet (a hard link: never replaces). True: linked, the caller
        must have the bytes and the folder fsynced before relying on the name; False: the name
        exists; None: this file system has no hard links (use :meth:`install`)."""
        final = self.root / relative
        try:
            with self._enospc_as_disk_full():
                self._make_dirs_durably(final.parent)
                os.link(received, final)
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                return None
            raise
        return True

    @contextlib.contextmanager
    def _enospc_as_disk_full(self) -> Iterator[None]:
        """ENOSPC from the file system becomes :class:`DiskFull` (answered 0xA700)."""
        try:
            yield
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull(f"no space left writing under {str(self.root)!r}") from exc
            raise

    def _make_dirs_durably(self, folder: Path) -> None:
        missing: list[Path] = []
        probe = folder
        while not probe.exists():
            missing.append(probe)
            probe = probe.parent
        for path in reversed(missing):
            with contextlib.suppress(FileExistsError):
                path.mkdir()
            fsync_path(path.parent)

    def write_atomically(self, relative: str, data: bytes) -> Path:
        """Write ``data`` durably at ``relative`` (temp file, fsync, rename, fsync folder)."""
        staging = self.tmp_dir / f"{Path(relative).name}.{os.getpid()}.{threading.get_ident()}.part"
        staging.parent.mkdir(parents=True, exist_ok=True)
        with staging.open("wb") as fh:
            fh.write(data)
        return self.install(staging, relative)

    def remove(self, relative: str) -> None:
        (self.root / relative).unlink(missing_ok=True)
