"""SQLAlchemy models: instances, studies and jobs (DESIGN.md §5).

The schema changes only through Alembic migrations in ``storage/migrations``; a test checks that
the migrations produce exactly these models.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

UID = String(64)
AE_TITLE = String(16)


def utc_now() -> dt.datetime:
    """The aware UTC "now" every timestamp column holds (passed in as ``now``/``clock``)."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite (naive text) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime) or value.tzinfo is None:
            raise ValueError(f"Argument 'value' must be an aware datetime, got {value!r}")
        utc: dt.datetime = value.astimezone(dt.UTC)
        return utc.replace(tzinfo=None) if dialect.name == "sqlite" else utc

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if not isinstance(value, dt.datetime):
            raise TypeError(f"Column value must be a datetime, got {value!r}")
        aware: dt.datetime = (
            value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
        )
        return aware


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"
    QUEUED = "queued"
    WAITING = "waiting"  # queued, but this node cannot analyse yet (no API key); last_error says why
    ANALYSING = "analysing"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # superseded: a newer version of the study was opened before it ran


class JobKind(enum.StrEnum):
    ANALYSE = "analyse"


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVING)
    # Incremented when instances arrive after analysis began: each version gets its own job/SR.
    version: Mapped[int] = mapped_column(Integer, default=1)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    series_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    settle_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    calling_ae_title: Mapped[str] = mapped_column(AE_TITLE, default="")
    analysed_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sr_sop_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Set when retention deleted the instance files (storage.retention_days after delivery).
    files_purged_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        Index("ix_studies_state_settle_at", "state", "settle_at"),
        # The console's studies page: newest first, alone or within a state or a calling AE.
        Index("ix_studies_first_received_at", "first_received_at"),
        Index("ix_studies_state_first_received_at", "state", "first_received_at"),
        Index("ix_studies_calling_ae_first_received_at", "calling_ae_title", "first_received_at"),
        # The studies page: current versions newest first (alone, or within a state through
        # ix_studies_state_settle_at), and the studies that have earlier versions.
        Index("ix_studies_settle_at", "settle_at"),
        Index("ix_studies_version", "version"),
    )


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_instance_uid"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(AE_TITLE)
    received_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    # Header facts indexed at ingest, so choosing series and slices reads no files. Raw DICOM
    # strings (multi-values joined by backslash), None when absent or stored before 0002.
    modality: Mapped[str | None] = mapped_column(String(16), nullable=True)
    image_type: Mapped[str | None] = mapped_column(Text, nullable=True)
    instance_number: Mapped[str | None] = mapped_column(String(12), nullable=True)
    image_position_patient: Mapped[str | None] = mapped_column(Text, nullable=True)
    image_orientation_patient: Mapped[str | None] = mapped_column(Text, nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[str | None] = mapped_column(String(12), nullable=True)
    photometric_interpretation: Mapped[str | None] = mapped_column(String(16), nullable=True)
    burned_in_annotation: Mapped[str | None] = mapped_column(String(3), nullable=True)
    body_part_examined: Mapped[str | None] = mapped_column(String(16), nullable=True)
    view_position: Mapped[str | None] = mapped_column(String(16), nullable=True)


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DEAD = "dead"  # refused for good; kept with the reason, never retried by itself


class Outbox(Base):
    """One SR to one destination (DESIGN.md §5). Unique per (destination, SR): an SR is queued
    for a destination once, however often the analysis that made it is completed."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    destination: Mapped[str] = mapped_column(String(64))
    sr_path: Mapped[str] = mapped_column(Text)
    sr_sop_instance_uid: Mapped[str] = mapped_column(UID)
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    lease_token: Mapped[str | None] = mapped_column(String(36), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)  # host:pid sending it
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)

    __table_args__ = (
        UniqueConstraint("destination", "sr_sop_instance_uid", name="uq_outbox_destination_sr"),
        Index("ix_outbox_claim", "destination", "state", "next_attempt_at"),
        Index("ix_outbox_state", "state"),  # the console's deliveries page: everything not sent
        # A study version's deliveries by state (the studies page's state of an earlier version).
        Index("ix_outbox_study_version_state", "study_instance_uid", "study_version", "state"),
    )


class DeliveryOutcome(enum.StrEnum):
    """How one delivery attempt ended."""

    SENT = "sent"
    RETRY = "retry"  # failed for now (0xA7xx, 0x0110, no answer): tried again later
    DEAD = "dead"  # refused for good, or out of attempts
    INTERRUPTED = "interrupted"  # the process sending it stopped before it knew


class DeliveryAttempt(Base):
    """One attempt to deliver an outbox row, written when it ends, in the same transaction as
    the outbox row's new state (storage.outbox): the delivery history the study page shows."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    outbox_id: Mapped[int] = mapped_column(BigInteger)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    destination: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)  # 1 for the first (counting again after a redeliver)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    ended_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(16))
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the DIMSE or HTTP status
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class ApiCall(Base):
    """One HTTP call to a vision API: what it cost and how it went (DESIGN.md §5)."""

    __tablename__ = "api_calls"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    job_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    provider: Mapped[str] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(128))
    images: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer)
    completion_tokens: Mapped[int] = mapped_column(Integer)
    cost_usd: Mapped[float] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    called_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, index=True)
    # What the request disclosed (the audit trail): where it went, the SHA-256 of each image
    # (space-separated, in the order sent), of the prompt and of the whole body, its size, when.
    endpoint_host: Mapped[str | None] = mapped_column(String(255), nullable=True)
    image_sha256: Mapped[str | None] = mapped_column(Text, nullable=True)
    prompt_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    request_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    request_bytes: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sent_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    study_instance_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_instance_uid"))
    study_version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    run_after: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_token: Mapped[str | None] = mapped_column(String(36), nullable=True)
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    route: Mapped[str | None] = mapped_column(
        String(64), nullable=True
    )  # the [[routes]] entry that queued it
    # The model's validated findings, committed as soon as the call returns, so a retry after a
    # later failure (SR build, disk, crash) never pays for the same answer twice.
    findings_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        # One job per study version: settling twice can never queue a second analysis.
        UniqueConstraint("kind", "study_instance_uid", "study_version", name="uq_jobs_study_version"),
        Index("ix_jobs_claim", "kind", "state", "priority", "run_after"),
        Index("ix_jobs_lease", "state", "lease_expires_at"),
    )


class JobClaim(Base):
    """One claim of a job by a worker (the lease it took), written with the claim: the study
    page's timeline shows each one, when and by whom."""

    __tablename__ = "job_claims"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[int] = mapped_column(BigInteger)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    study_version: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    claimed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    owner: Mapped[str] = mapped_column(String(128))  # host:pid:incarnation of the worker


class VersionInstance(Base):
    """The fixed set of instances of one study version, recorded when the version is queued
    (PS3.3 C.17.2: the SR's evidence lists this set). The analysis uses exactly these; an
    instance that arrives later belongs to a later version."""

    __tablename__ = "version_instances"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, ForeignKey("studies.study_instance_uid"))
    study_version: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(UID)

    __table_args__ = (
        UniqueConstraint(
            "study_instance_uid", "study_version", "sop_instance_uid", name="uq_version_instances"
        ),
    )


class Installation(Base):
    """One row: this installation's random value, made at its first start (migration 0010), the
    namespace of every UID the node derives (analysis.uids). Nodes sharing a database share it,
    so they mint the same UID for the same input; another installation never does."""

    __tablename__ = "installation"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    uid_namespace: Mapped[str] = mapped_column(String(36))


class ConsoleAction(Base):
    """An action taken from the web console (retry, complete, cancel, redeliver): who, when, what."""

    __tablename__ = "console_actions"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    who: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    study_instance_uid: Mapped[str | None] = mapped_column(UID, nullable=True, index=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)


class ConsoleLogout(Base):
    """A console session logged out before it expired (its random id, from the signed cookie),
    kept until then: the cookie, or a copy of it, opens nothing any more, across restarts and
    on every node that shares the database."""

    __tablename__ = "console_logouts"

    session: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
