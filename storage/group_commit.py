"""Group commit: instances that finish receiving at about the same time share one transaction.

Every C-STORE must be durable before its 0x0000: its file's folder fsynced and its row committed.
Done one by one, ten associations queue behind each other's fsyncs and, on SQLite, behind the one
write lock (whose busy handler sleeps). Here the association threads hand their instances to a
batch: the first thread to arrive becomes the leader, fsyncs each folder the batch wrote into once,
records every instance in one transaction, commits (one WAL sync), and hands each waiting thread
its own result. Instances that arrive while a leader commits form the next batch, led by the first
of them. A lone sender leads its own batch of one in its own thread: no hand-off, no added latency.

If the batch's transaction fails for one instance (a unique key another node won, a value the
database cannot hold), each instance of the batch is recorded again in its own transaction, so one
cannot fail the others; only an unavailable database or disk fails the whole batch.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage.db import transaction
from storage.errors import DiskFull, StorageUnavailable
from storage.files import fsync_path
from storage.studies import IngestResult, ReceivedInstance, record_instance

log = logging.getLogger("ainode.storage")
Clock = Callable[[], dt.datetime]
MAX_BATCH = 64


@dataclass
class _Pending:
    instance: ReceivedInstance
    folder: Path | None  # to fsync before the commit (the file was renamed into it)
    durable: Future[None] | None = None  # the file's own fsync, still running: waited for
    lead: bool = False  # this thread commits the next batch
    finished: bool = False
    result: IngestResult | None = None
    error: BaseException | None = None


@dataclass
class BatchStats:
    """What the batches did since start (for the benchmarks)."""

    batches: int = 0
    instances: int = 0
    largest: int = 0


def wait_for_durable_bytes(durable: Future[None] | None) -> None:
    """Wait for a received file's own fsync (None: nothing to wait for); its failure as
    :class:`StorageUnavailable` (:class:`DiskFull` when the disk is full)."""
    if durable is None:
        return
    try:
        durable.result()
    except StorageUnavailable:
        raise
    except OSError as exc:
        raise StorageUnavailable(f"cannot sync a received file: {exc.strerror}") from exc


class GroupCommitter:
    def __init__(self, sessions: sessionmaker[Session], settle_seconds: float, clock: Clock) -> None:
        self.sessions = sessions
        self.settle_seconds = settle_seconds
        self.clock = clock
        self.stats = BatchStats()
        self._changed = threading.Condition()
        self._pending: list[_Pending] = []
        self._leading = False

    def record(
        self, instance: ReceivedInstance, folder: Path | None, durable: Future[None] | None = None
    ) -> IngestResult:
        """Make ``folder`` (where the instance's file was renamed) durable and commit the
        instance's row, with whatever else is waiting; returns once that commit is done.
        ``durable``: the file's own fsync, still running; the row is committed only once it
        succeeded (it fails only this instance).
        Raises what recording it raised (:class:`StorageUnavailable` when the database or the
        disk cannot take it)."""
        mine = _Pending(instance, folder, durable)
        with self._changed:
            self._pending.append(mine)
            if not self._leading:
                self._leading = mine.lead = True
            self._changed.wait_for(lambda: mine.lead or mine.finished)
        if not mine.finished:
            self._lead()
        if mine.error is not None:
            raise mine.error
        if mine.result is None:
            raise RuntimeError("group commit finished an instance without a result")
        return mine.result

    def _lead(self) -> None:
        """Commit one batch (the leader's own instance is first in it), then pass the lead to
        the first instance that arrived meanwhile."""
        with self._changed:
            batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
        try:
            self._commit(batch)
        finally:
            with self._changed:
                for item in batch:
                    item.finished = True
                if self._pending:
                    self._pending[0].lead = True
                else:
                    self._leading = False
                self._changed.notify_all()

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            self._sync_folders(batch)
        except StorageUnavailable as exc:
            for item in batch:
                item.error = exc
            return
        batch = self._with_durable_bytes(batch)
        if not batch:
            return
        try:
            results = self._record_all(batch)
        except StorageUnavailable as exc:  # the database is down: every association gets 0xA700
            for item in batch:
                item.error = exc
            return
        except Exception:
            # One instance the database refused (a unique key another node won, a value it
            # cannot hold): each again alone, so it fails only itself.
            self._record_each(batch)
            return
        for item, result in zip(batch, results, strict=True):
            item.result = result
        self.stats.batches += 1
        self.stats.instances += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))

    def _sync_folders(self, batch: list[_Pending]) -> None:
        for folder in {item.folder for item in batch if item.folder is not None}:
            try:
                fsync_path(folder)
            except OSError as exc:
                if exc.errno == 28:  # ENOSPC
                    raise DiskFull(f"no space left syncing {str(folder)!r}") from exc
                raise StorageUnavailable(f"cannot sync {str(folder)!r}: {exc.strerror}") from exc

    @staticmethod
    def _with_durable_bytes(batch: list[_Pending]) -> list[_Pending]:
        """The instances whose file's own fsync succeeded; the others get its error."""
        durable = []
        for item in batch:
            try:
                wait_for_durable_bytes(item.durable)
            except StorageUnavailable as exc:
                item.error = exc
                continue
            durable.append(item)
        return durable

    def commit_together(
        self, requests: list[tuple[ReceivedInstance, Path | None]]
    ) -> list[IngestResult | BaseException]:
        """Commit these now, in this thread, in batches of at most :data:`MAX_BATCH` (the
        commit process's loop, :mod:`storage.commit_process`): each one's result or error."""
        batch = [_Pending(instance, folder) for instance, folder in requests]
        for start in range(0, len(batch), MAX_BATCH):
            self._commit(batch[start : start + MAX_BATCH])
        outcomes: list[IngestResult | BaseException] = []
        for item in batch:
            if item.error is not None:
                outcomes.append(item.error)
            elif item.result is not None:
                outcomes.append(item.result)
            else:
                outcomes.append(RuntimeError("group commit finished an instance without a result"))
        return outcomes

    def _record_all(self, batch: list[_Pending]) -> list[IngestResult]:
        now = self.clock()
        with transaction(self.sessions) as session:
            return [record_instance(session, item.instance, self.settle_seconds, now) for item in batch]

    def _record_each(self, batch: list[_Pending]) -> None:
        for item in batch:
            try:
                item.result = self._record_one(item.instance)
            except Exception as exc:  # handed to the waiting association
                item.error = exc

    def _record_one(self, instance: ReceivedInstance) -> IngestResult:
        # Two nodes storing the same new SOP Instance UID at once both find no row; on
        # PostgreSQL the second insert then hits the unique key. Its retry sees the first's row.
        try:
            with transaction(self.sessions) as session:
                return record_instance(session, instance, self.settle_seconds, self.clock())
        except IntegrityError:
            with transaction(self.sessions) as session:
                return record_instance(session, instance, self.settle_seconds, self.clock())
