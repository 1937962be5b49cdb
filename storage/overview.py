"""What the node holds, for people: the one query layer behind ``ainode status`` and the web
console (one query layer, two faces).

Every function here only reads (a plain session: on SQLite a deferred ``BEGIN`` that never takes
the write lock, so a console left open on a busy page never holds up a C-STORE commit), and
reads a page of studies in a fixed number of queries whatever its length: the page's studies
first (indexed, newest first), then the jobs, costs, deliveries and modalities of exactly those
studies, each in one query (never one query per study).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Select, and_, case, func, literal, literal_column, or_, select, tuple_, union_all
from sqlalchemy.orm import Session, defer

from storage.models import (
    ApiCall,
    ConsoleAction,
    DeliveryAttempt,
    DeliveryState,
    Instance,
    Job,
    JobClaim,
    JobKind,
    JobState,
    Outbox,
    Study,
    StudyState,
    VersionInstance,
)

T = TypeVar("T")
Rows = Select[*tuple[Any, ...]]  # a SELECT of any columns
# Well under SQLite's limit on bound parameters (32766 since 3.32, 999 before).
IN_CHUNK = 500
UNSENT_STATES = (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.DEAD)


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


def _chunks(values: Sequence[T] | None, size: int = IN_CHUNK) -> Iterator[Sequence[T] | None]:
    """``values`` in slices for ``IN (...)``; None (every study) once, for one query without IN."""
    if values is None:
        yield None
        return
    yield from _slices(values, size)


def _slices(values: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def _among(column: Any, chunk: Sequence[str] | None) -> Any:
    return column.in_(chunk) if chunk is not None else column.is_not(None)


def _among_versions(uid: Any, version: Any, pairs: Sequence[tuple[str, int]]) -> tuple[Any, Any]:
    """Conditions for rows whose (study UID, version) is one of ``pairs``. The UIDs alone come
    first: SQLite looks row values up by no index (a scan of the table)."""
    return uid.in_(sorted({study for study, _ in pairs})), tuple_(uid, version).in_(pairs)


# A version's state: the study's own for its current version; for an earlier one, what became
# of it (a job that never ran because a newer version replaced it is "superseded").
SUPERSEDED = "superseded"
VERSION_STATES = (*(str(s) for s in StudyState), SUPERSEDED)


@dataclass(frozen=True)
class StudyFilter:
    """The studies page's filters; every one optional. ``state``: the version's state;
    ``uid``: a Study Instance UID or its beginning; ``received_from``/``received_before``: the
    version's time (when it settled and was queued; while receiving, when it will) in
    [from, before)."""

    state: str | None = None
    modality: str | None = None
    calling_ae_title: str | None = None
    received_from: dt.datetime | None = None
    received_before: dt.datetime | None = None
    uid: str | None = None

    def __post_init__(self) -> None:
        if self.state is not None and self.state not in VERSION_STATES:
            raise ValueError(f'Argument "state" must be one of {sorted(VERSION_STATES)}, got {self.state!r}')

    def apply_study(self, statement: Rows) -> Rows:
        """The filters that are about the study (calling AE, UID, modality)."""
        if self.calling_ae_title:
            statement = statement.where(Study.calling_ae_title == self.calling_ae_title)
        if self.uid:
            # A range on the primary key, not LIKE (case-insensitive in SQLite, so no index):
            # UIDs are digits and dots, all below "~".
            statement = statement.where(Study.study_instance_uid >= self.uid).where(
                Study.study_instance_uid < self.uid + "~"
            )
        if self.modality:
            # EXISTS on the instances' study index: walking the newest-first index, a page
            # stops after its last match.
            statement = statement.where(
                select(Instance.id)
                .where(Instance.study_instance_uid == Study.study_instance_uid)
                .where(Instance.modality == self.modality)
                .exists()
            )
        return statement

    def apply_time(self, statement: Rows, at: Any) -> Rows:
        if self.received_from is not None:
            statement = statement.where(at >= self.received_from)
        if self.received_before is not None:
            statement = statement.where(at < self.received_before)
        return statement


def _current_jobs(session: Session, studies: Sequence[Study], every: bool) -> dict[str, Any]:
    """The job of each study's current version (one query per chunk of studies, or one for all)."""
    wanted = {(s.study_instance_uid, s.version) for s in studies}
    jobs: dict[str, Any] = {}
    for chunk in _chunks(None if every else [s.study_instance_uid for s in studies]):
        for job in session.execute(
            select(
                Job.study_instance_uid, Job.study_version, Job.attempts, Job.last_error, Job.updated_at
            ).where(Job.kind == JobKind.ANALYSE, _among(Job.study_instance_uid, chunk))
        ):
            if (job.study_instance_uid, job.study_version) in wanted:
                jobs[job.study_instance_uid] = job
    return jobs


def _costs(session: Session, uids: Sequence[str] | None) -> dict[str, float]:
    costs: dict[str, float] = {}
    for chunk in _chunks(uids):
        for uid, total in session.execute(
            select(ApiCall.study_instance_uid, func.sum(ApiCall.cost_usd))
            .where(_among(ApiCall.study_instance_uid, chunk))
            .group_by(ApiCall.study_instance_uid)
        ):
            costs[uid] = float(total or 0.0)
    return costs


def _deliveries(session: Session, uids: Sequence[str] | None) -> dict[str, list[dict[str, Any]]]:
    sends: dict[str, list[dict[str, Any]]] = {}
    for chunk in _chunks(uids):
        for row in session.execute(
            select(
                Outbox.destination,
                Outbox.state,
                Outbox.attempts,
                Outbox.last_error,
                Outbox.sr_sop_instance_uid,
                Outbox.study_instance_uid,
                Outbox.updated_at,
            )
            .where(_among(Outbox.study_instance_uid, chunk))
            .order_by(Outbox.id)
        ):
            sends.setdefault(row.study_instance_uid, []).append(
                {
                    "destination": row.destination,
                    "state": row.state,
                    "attempts": row.attempts,
                    "last_error": row.last_error,
                    "sr_sop_instance_uid": row.sr_sop_instance_uid,
                    "updated_at": row.updated_at,
                }
            )
    return sends


def _header_facts(session: Session, uids: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """Each study's modalities and body parts (distinct, from the header index)."""
    facts: dict[str, dict[str, list[str]]] = {}
    for chunk in _chunks(uids):
        for uid, modality, body_part in session.execute(
            select(Instance.study_instance_uid, Instance.modality, Instance.body_part_examined)
            .where(_among(Instance.study_instance_uid, chunk))
            .distinct()
        ):
            entry = facts.setdefault(uid, {"modalities": [], "body_parts": []})
            if modality and modality not in entry["modalities"]:
                entry["modalities"].append(modality)
            if body_part and body_part not in entry["body_parts"]:
                entry["body_parts"].append(body_part)
    return facts


def _rows(
    session: Session, studies: Sequence[Study], header_facts: bool, timestamps: bool, every: bool = False
) -> list[dict[str, Any]]:
    """``every``: ``studies`` are all the studies: each related table is read in one query
    without ``IN``, instead of slices of a page's UIDs."""
    uids = [s.study_instance_uid for s in studies]
    among = None if every else uids
    jobs = _current_jobs(session, studies, every)
    costs = _costs(session, among)
    sends = _deliveries(session, among)
    facts = _header_facts(session, uids) if header_facts else {}
    rows: list[dict[str, Any]] = []
    for study in studies:
        uid = study.study_instance_uid
        job = jobs.get(uid)
        deliveries = sends.get(uid, [])
        row: dict[str, Any] = {
            "study_instance_uid": uid,
            "state": study.state,
            "version": study.version,
            "instance_count": study.instance_count,
            "series_count": study.series_count,
            "calling_ae_title": study.calling_ae_title,
            "first_received_at": _iso(study.first_received_at),
            "last_received_at": _iso(study.last_received_at),
            "settle_at": _iso(study.settle_at),
            "attempts": job.attempts if job is not None else 0,
            "last_error": study.last_error or (job.last_error if job is not None else None),
            "sr_sop_instance_uid": study.sr_sop_instance_uid,
            "deliveries": [{k: v for k, v in d.items() if k != "updated_at"} for d in deliveries],
            "cost_usd": round(costs[uid], 6) if uid in costs else None,
        }
        if header_facts:
            row.update(facts.get(uid, {"modalities": [], "body_parts": []}))
        if timestamps:
            # When the study last moved: its state carries no timestamp of its own, so the newest
            # of what moves it (an instance, its job, a delivery).
            moments = [study.last_received_at]
            if job is not None:
                moments.append(job.updated_at)
            moments += [d["updated_at"] for d in deliveries]
            row["state_since"] = max(moments)
            row["first_received"] = study.first_received_at
        rows.append(row)
    return rows


def disclosure_query(study_instance_uid: str | None = None) -> Select[ApiCall]:
    """Every request that left for a vision API (with what it disclosed), oldest first."""
    query = select(ApiCall).where(ApiCall.request_sha256.is_not(None)).order_by(ApiCall.id)
    return (
        query if study_instance_uid is None else query.where(ApiCall.study_instance_uid == study_instance_uid)
    )


def disclosure_record(call: ApiCall) -> dict[str, object]:
    """One request as the audit trail shows it (the same fields as the audit log's lines)."""
    return {
        "study_instance_uid": call.study_instance_uid,
        "sent_at": call.sent_at.isoformat(timespec="milliseconds") if call.sent_at else None,
        "provider": call.provider,
        "endpoint_host": call.endpoint_host,
        "model": call.model,
        "image_sha256": (call.image_sha256 or "").split(),
        "prompt_sha256": call.prompt_sha256,
        "request_sha256": call.request_sha256,
        "request_bytes": call.request_bytes,
        "status": call.status,
    }


def study_rows(session: Session) -> list[dict[str, Any]]:
    """``ainode status``: every study, oldest first, with its deliveries and what each request
    to a vision API disclosed (DESIGN.md §3; issue 13's audit trail)."""
    studies = list(session.scalars(select(Study).order_by(Study.first_received_at)))
    rows = _rows(session, studies, header_facts=False, timestamps=False, every=True)
    disclosed: dict[str, list[dict[str, object]]] = {}
    for call in session.scalars(disclosure_query()):
        disclosed.setdefault(call.study_instance_uid, []).append(disclosure_record(call))
    for row in rows:
        row["disclosures"] = disclosed.get(row["study_instance_uid"], [])
    return rows


def _outbox_of_job(states: Sequence[str] | None = None) -> Any:
    """EXISTS a delivery of the job's study version (in one of ``states``)."""
    query = select(Outbox.id).where(
        Outbox.study_instance_uid == Job.study_instance_uid, Outbox.study_version == Job.study_version
    )
    return (query.where(Outbox.state.in_(list(states))) if states else query).exists()


def earlier_version_state() -> Any:
    """What became of an earlier version of a study, from its job and its deliveries, in SQL
    (for the filter): as ``storage.outbox`` settles a study, anything still to send first, then
    anything dead-lettered. A job that never ran because a newer version replaced it is
    "superseded"; one that succeeded with no findings and nothing to send found nothing to
    analyse. (The current version's state is the study's own.)"""
    return case(
        (Job.state.in_([JobState.QUEUED, JobState.CANCELLED]), literal(SUPERSEDED)),
        (Job.state == JobState.RUNNING, literal(str(StudyState.ANALYSING))),
        (Job.state == JobState.FAILED, literal(str(StudyState.FAILED))),
        (_outbox_of_job([DeliveryState.PENDING, DeliveryState.SENDING]), literal(str(StudyState.SENDING))),
        (_outbox_of_job([DeliveryState.DEAD]), literal(str(StudyState.FAILED))),
        (and_(Job.findings_json.is_(None), ~_outbox_of_job()), literal(str(StudyState.SKIPPED))),
        else_=literal(str(StudyState.DONE)),
    )


def _earlier_state(job: Any, deliveries: Sequence[Any]) -> str:
    """:func:`earlier_version_state` for one version already read (the page's rows): the same
    rules, in the same order."""
    if job is None or job.state in (JobState.QUEUED, JobState.CANCELLED):
        return SUPERSEDED
    if job.state == JobState.RUNNING:
        return str(StudyState.ANALYSING)
    if job.state == JobState.FAILED:
        return str(StudyState.FAILED)
    states = {d.state for d in deliveries}
    if states & {DeliveryState.PENDING, DeliveryState.SENDING}:
        return str(StudyState.SENDING)
    if DeliveryState.DEAD in states:
        return str(StudyState.FAILED)
    if not job.has_findings and not deliveries:
        return str(StudyState.SKIPPED)
    return str(StudyState.DONE)


def _version_arms(where: StudyFilter) -> tuple[Rows, Rows]:
    """Every study version as a row (uid, version, at, state), in two index walks, newest
    first. Each study's current version comes from the studies table, at its ``settle_at``
    (when it settled and was queued, or, while it is receiving, when it will), so the state
    filter and the order are one index (state, settle_at). The earlier versions are the jobs
    below their study's version, at the time each was queued; their state is worked out from
    their job and deliveries (in SQL only to filter on it; a page's rows in Python)."""
    current: Rows = select(
        Study.study_instance_uid.label("uid"),
        Study.version.label("version"),
        Study.settle_at.label("at"),
    )
    current = where.apply_time(where.apply_study(current), Study.settle_at)
    state = earlier_version_state()
    # Driven from the studies past version 1 (an index on the version; IN, not a join: SQLite
    # would walk every job first, reading each one's row), then their jobs through the
    # (kind, study, version) key. Their number, not the number of studies, is what it costs.
    studies_with_earlier = where.apply_study(select(Study.study_instance_uid).where(Study.version > 1))
    current_version = (
        select(Study.version).where(Study.study_instance_uid == Job.study_instance_uid).scalar_subquery()
    )
    earlier: Rows = select(
        Job.study_instance_uid.label("uid"),
        Job.study_version.label("version"),
        Job.created_at.label("at"),
    ).where(
        Job.kind == JobKind.ANALYSE,
        Job.study_instance_uid.in_(studies_with_earlier),
        Job.study_version < current_version,
    )
    earlier = where.apply_time(earlier, Job.created_at)
    if where.state:
        current = current.where(Study.state == where.state)
        earlier = earlier.where(state == where.state)
    return current, earlier


def count_versions(session: Session, where: StudyFilter = StudyFilter()) -> int:
    """How many study versions the filter matches (the studies page's rows)."""
    return sum(
        int(session.scalar(select(func.count()).select_from(arm.subquery())) or 0)
        for arm in _version_arms(where)
    )


def version_page(
    session: Session, where: StudyFilter = StudyFilter(), limit: int = 50, offset: int = 0
) -> list[dict[str, Any]]:
    """One page of study versions, newest first (the console's studies page): each version's
    state, attempts, cost, SR and deliveries, with its study's modalities, body parts, counts
    and calling AE, in a fixed number of queries whatever the page's length."""
    if limit < 1:
        raise ValueError(f'Argument "limit" must be at least 1, got {limit}')
    if offset < 0:
        raise ValueError(f'Argument "offset" must not be negative, got {offset}')
    # UNION ALL of two index walks, each newest first: both databases merge them and stop
    # after the page.
    order: list[Any] = [literal_column(name).desc() for name in ("at", "uid", "version")]
    picked = session.execute(
        union_all(*_version_arms(where)).order_by(*order).limit(limit).offset(offset)
    ).all()
    uids = sorted({row.uid for row in picked})
    wanted = {(row.uid, row.version) for row in picked}
    studies = {
        study.study_instance_uid: study
        for chunk in _chunks(uids)
        for study in session.scalars(select(Study).where(_among(Study.study_instance_uid, chunk)))
    }
    # Exactly the page's versions (row values), never all the versions of its studies: one of
    # them may have thousands.
    pairs = sorted(wanted)
    jobs: dict[tuple[str, int], Any] = {}
    for pair_chunk in _slices(pairs, IN_CHUNK // 2):  # two parameters each
        for found in session.execute(
            select(
                Job.id,
                Job.study_instance_uid,
                Job.study_version,
                Job.state,
                Job.attempts,
                Job.last_error,
                Job.updated_at,
                Job.findings_json.is_not(None).label("has_findings"),
            ).where(
                Job.kind == JobKind.ANALYSE,
                *_among_versions(Job.study_instance_uid, Job.study_version, pair_chunk),
            )
        ):
            jobs[(found.study_instance_uid, found.study_version)] = found
    job_costs: dict[int, float] = {}
    loose_costs: dict[str, float] = {}  # calls recorded without their job: the current version's
    job_ids = [job.id for job in jobs.values()]
    for chunk in _chunks(uids):
        for uid, job_id, total in session.execute(
            select(ApiCall.study_instance_uid, ApiCall.job_id, func.sum(ApiCall.cost_usd))
            .where(
                _among(ApiCall.study_instance_uid, chunk),
                or_(ApiCall.job_id.in_(job_ids), ApiCall.job_id.is_(None)),
            )
            .group_by(ApiCall.study_instance_uid, ApiCall.job_id)
        ):
            if job_id is None:
                loose_costs[uid] = float(total or 0.0)
            else:
                job_costs[job_id] = float(total or 0.0)
    sends: dict[tuple[str, int], list[Any]] = {}
    for pair_chunk in _slices(pairs, IN_CHUNK // 2):  # two parameters each
        for send in session.execute(
            select(
                Outbox.study_instance_uid,
                Outbox.study_version,
                Outbox.destination,
                Outbox.sr_path,
                Outbox.state,
                Outbox.last_error,
                Outbox.sr_sop_instance_uid,
                Outbox.updated_at,
            )
            .where(*_among_versions(Outbox.study_instance_uid, Outbox.study_version, pair_chunk))
            .order_by(Outbox.id)
        ):
            sends.setdefault((send.study_instance_uid, send.study_version), []).append(send)
    facts = _header_facts(session, uids)
    rows: list[dict[str, Any]] = []
    for picked_row in picked:
        study = studies[picked_row.uid]
        job = jobs.get((picked_row.uid, picked_row.version))
        current = picked_row.version == study.version
        deliveries = sends.get((picked_row.uid, picked_row.version), [])
        if current:
            sr = study.sr_sop_instance_uid
        else:
            sr = next((d.sr_sop_instance_uid for d in deliveries if d.sr_path.startswith("sr/")), None)
        cost = job_costs.get(job.id) if job is not None else None
        if current and picked_row.uid in loose_costs:
            cost = (cost or 0.0) + loose_costs[picked_row.uid]
        problems = [
            f"{d.destination}: {d.last_error}"
            for d in deliveries
            if d.last_error and d.state != DeliveryState.SENT
        ]
        error = (study.last_error if current else None) or (job.last_error if job is not None else None)
        moments = [d.updated_at for d in deliveries]
        if job is not None:
            moments.append(job.updated_at)
        if current:
            moments.append(study.last_received_at)
        rows.append(
            {
                "study_instance_uid": picked_row.uid,
                "version": picked_row.version,
                "current": current,
                "versions": study.version,
                "state": study.state if current else _earlier_state(job, deliveries),
                "at": picked_row.at,
                "state_since": max(moments) if moments else picked_row.at,
                "instance_count": study.instance_count,
                "series_count": study.series_count,
                "calling_ae_title": study.calling_ae_title,
                "first_received": study.first_received_at,
                "attempts": job.attempts if job is not None else 0,
                "cost_usd": round(cost, 6) if cost is not None else None,
                "sr_sop_instance_uid": sr,
                "last_error": error,
                "problems": problems,
                "deliveries": [
                    {"destination": d.destination, "state": d.state, "last_error": d.last_error}
                    for d in deliveries
                ],
                **facts.get(picked_row.uid, {"modalities": [], "body_parts": []}),
            }
        )
    return rows


def filter_choices(session: Session) -> dict[str, list[str]]:
    """The values the studies page's filters offer: states, modalities, calling AE titles."""
    aes = session.scalars(select(Study.calling_ae_title).distinct().order_by(Study.calling_ae_title))
    modalities = session.scalars(
        select(Instance.modality).where(Instance.modality.is_not(None)).distinct().order_by(Instance.modality)
    )
    return {
        "states": list(VERSION_STATES),
        "modalities": [m for m in modalities if m],
        "calling_ae_titles": [a for a in aes if a],
    }


# The study page on a study with thousands of versions or delivery attempts: the newest so many
# of each are read, and the newest TIMELINE_LIMIT moments shown (``ainode status --json`` and
# the database keep all of them).
DETAIL_LIMIT = 2000
TIMELINE_LIMIT = 500


def file_kind(path: str) -> str:
    """What a file the node made is, from its folder (``sr/...``, ``summary/...``)."""
    folder = path.split("/", 1)[0]
    return {"sr": "SR", "summary": "summary image", "kos": "key images", "gsps": "presentation state"}.get(
        folder, folder
    )


@dataclass(frozen=True)
class StudyDetail:
    study: Study
    jobs: list[Job]  # oldest version first (findings_json deferred: read for one version only)
    version_sizes: dict[int, int]
    series: list[dict[str, Any]]
    api_calls: list[ApiCall]
    deliveries: list[Outbox]
    attempts: list[DeliveryAttempt]  # each delivery attempt that ended, oldest first
    claims: list[JobClaim]  # each claim of an analysis by a worker, oldest first
    actions: list[ConsoleAction]
    a_file: str | None  # one instance file (relative to the storage root), for the patient header
    truncated: bool = False  # some source held more than DETAIL_LIMIT rows: only the newest read

    @property
    def current_job(self) -> Job | None:
        return self.job_of(self.study.version)

    def job_of(self, version: int) -> Job | None:
        return next((j for j in self.jobs if j.study_version == version), None)

    def report_uid(self, version: int, folder: str = "sr") -> str | None:
        """The SOP Instance UID of the SR (or summary image: ``folder``) made for ``version``."""
        if folder == "sr" and version == self.study.version and self.study.sr_sop_instance_uid:
            return self.study.sr_sop_instance_uid
        return next(
            (
                d.sr_sop_instance_uid
                for d in reversed(self.deliveries)
                if d.study_version == version and d.sr_path.startswith(f"{folder}/")
            ),
            None,
        )

    def timeline(self, limit: int = TIMELINE_LIMIT) -> tuple[list[dict[str, Any]], int]:
        """The study's recorded moments, oldest first: the newest ``limit`` of them, and how
        many earlier ones are left out."""
        study = self.study
        events: list[dict[str, Any]] = [
            {"at": study.first_received_at, "what": "first instance received", "detail": ""},
            {
                "at": study.last_received_at,
                "what": "last instance received",
                "detail": f"{study.instance_count} instances, {study.series_count} series",
            },
        ]
        for job in self.jobs:
            size = self.version_sizes.get(job.study_version)
            events.append(
                {
                    "at": job.created_at,
                    "what": f"version {job.study_version} settled and queued",
                    "detail": (f"{size} instances" if size is not None else "")
                    + (f", route {job.route}" if job.route else ""),
                }
            )
            events.append(
                {
                    "at": job.updated_at,
                    "what": f"version {job.study_version} analysis {job.state}",
                    "detail": f"claimed {job.attempts} time(s)"
                    + (f"; {job.last_error}" if job.last_error else ""),
                }
            )
        for claim in self.claims:
            events.append(
                {
                    "at": claim.claimed_at,
                    "what": f"version {claim.study_version} claimed by a worker",
                    "detail": f"attempt {claim.attempt}, by {claim.owner}",
                }
            )
        for call in self.api_calls:
            events.append(
                {
                    "at": call.called_at,
                    "what": f"model call {call.provider} / {call.model}",
                    "detail": f"status {call.status if call.status is not None else 'none'}, "
                    f"{call.latency_ms:.0f} ms, {call.images} image(s), {call.prompt_tokens} + "
                    f"{call.completion_tokens} tokens, ${call.cost_usd:.4f}"
                    + (f"; {call.error}" if call.error else "")
                    + (
                        f"; sent {call.request_bytes} bytes to {call.endpoint_host}, "
                        f"SHA-256 {call.request_sha256[:16]}…"
                        if call.request_sha256 and call.request_bytes is not None
                        else ""
                    ),
                }
            )
        attempted = {a.outbox_id for a in self.attempts}
        built: set[str] = set()
        for delivery in self.deliveries:
            kind = file_kind(delivery.sr_path)
            if delivery.sr_sop_instance_uid not in built:
                built.add(delivery.sr_sop_instance_uid)
                events.append(
                    {
                        "at": delivery.created_at,
                        "what": f"version {delivery.study_version} {kind} built",
                        "detail": delivery.sr_sop_instance_uid,
                    }
                )
            if delivery.state == DeliveryState.PENDING and delivery.attempts > 0:
                events.append(
                    {
                        "at": delivery.updated_at,
                        "what": f"delivery to {delivery.destination}: next attempt due",
                        "detail": f"version {delivery.study_version} {kind}, attempt "
                        f"{delivery.attempts + 1} at {_iso(delivery.next_attempt_at)}",
                    }
                )
            if delivery.id not in attempted and delivery.attempts > 0 and not self.truncated:
                # Attempts made before they were recorded one by one: the row's last word.
                events.append(
                    {
                        "at": delivery.sent_at or delivery.updated_at,
                        "what": f"delivery to {delivery.destination}: {delivery.state}",
                        "detail": f"version {delivery.study_version} {kind}, {delivery.attempts} "
                        "attempt(s)"
                        + (
                            f", status 0x{delivery.last_status:04X}"
                            if delivery.last_status is not None
                            else ""
                        )
                        + (f"; {delivery.last_error}" if delivery.last_error else ""),
                    }
                )
        kinds = {d.id: file_kind(d.sr_path) for d in self.deliveries}
        for attempt in self.attempts:
            took = (
                f", {(attempt.ended_at - attempt.started_at).total_seconds() * 1000:.0f} ms"
                if attempt.started_at is not None
                else ""
            )
            events.append(
                {
                    "at": attempt.ended_at,
                    "what": f"delivery to {attempt.destination}: {attempt.outcome}",
                    "detail": f"version {attempt.study_version} {kinds.get(attempt.outbox_id, 'file')}, "
                    f"attempt {attempt.attempt}"
                    + (f", status 0x{attempt.status:04X}" if attempt.status is not None else "")
                    + took
                    + (f"; {attempt.error}" if attempt.error else ""),
                    "outcome": attempt.outcome,
                }
            )
        for action in self.actions:
            events.append(
                {"at": action.at, "what": f"{action.action} by {action.who}", "detail": action.detail or ""}
            )
        events.sort(key=lambda e: e["at"])
        hidden = max(0, len(events) - limit)
        return events[hidden:], hidden


def _newest(session: Session, statement: Select[Any], key: Any) -> tuple[list[Any], bool]:
    """The newest DETAIL_LIMIT rows of ``statement`` by ``key``, oldest first, and whether
    there were more."""
    rows = list(session.scalars(statement.order_by(key.desc()).limit(DETAIL_LIMIT + 1)))
    return rows[:DETAIL_LIMIT][::-1], len(rows) > DETAIL_LIMIT


def study_detail(session: Session, study_instance_uid: str) -> StudyDetail | None:
    study = session.get(Study, study_instance_uid)
    if study is None:
        return None
    uid = study_instance_uid
    jobs, more_jobs = _newest(
        session,
        select(Job)
        .options(defer(Job.findings_json))
        .where(Job.kind == JobKind.ANALYSE, Job.study_instance_uid == uid),
        Job.study_version,
    )
    sizes = dict(
        session.execute(  # type: ignore[arg-type]
            select(VersionInstance.study_version, func.count())
            .where(VersionInstance.study_instance_uid == uid)
            .group_by(VersionInstance.study_version)
        ).all()
    )
    series = [
        {"series_instance_uid": s, "modality": m, "body_part": b, "instances": n}
        for s, m, b, n in session.execute(
            select(
                Instance.series_instance_uid,
                func.max(Instance.modality),
                func.max(Instance.body_part_examined),
                func.count(),
            )
            .where(Instance.study_instance_uid == uid)
            .group_by(Instance.series_instance_uid)
            .order_by(Instance.series_instance_uid)
        )
    ]
    calls, more_calls = _newest(session, select(ApiCall).where(ApiCall.study_instance_uid == uid), ApiCall.id)
    deliveries, more_deliveries = _newest(
        session, select(Outbox).where(Outbox.study_instance_uid == uid), Outbox.id
    )
    attempts, more_attempts = _newest(
        session, select(DeliveryAttempt).where(DeliveryAttempt.study_instance_uid == uid), DeliveryAttempt.id
    )
    claims, more_claims = _newest(
        session, select(JobClaim).where(JobClaim.study_instance_uid == uid), JobClaim.id
    )
    actions, more_actions = _newest(
        session, select(ConsoleAction).where(ConsoleAction.study_instance_uid == uid), ConsoleAction.id
    )
    a_file = session.scalar(select(Instance.path).where(Instance.study_instance_uid == uid).limit(1))
    return StudyDetail(
        study,
        jobs,
        sizes,
        series,
        calls,
        deliveries,
        attempts,
        claims,
        actions,
        a_file,
        truncated=more_jobs or more_calls or more_deliveries or more_attempts or more_claims or more_actions,
    )


def version_findings(session: Session, study_instance_uid: str, version: int) -> str | None:
    """The findings (JSON) the model gave for one version of a study, or None."""
    return session.scalar(
        select(Job.findings_json).where(
            Job.kind == JobKind.ANALYSE,
            Job.study_instance_uid == study_instance_uid,
            Job.study_version == version,
        )
    )


def unsent_deliveries(
    session: Session, state: str | None = None, limit: int = 500, offset: int = 0
) -> list[Outbox]:
    """Everything not yet delivered (pending, being sent, dead-lettered), oldest first."""
    states = [state] if state else list(UNSENT_STATES)
    return list(
        session.scalars(
            select(Outbox).where(Outbox.state.in_(states)).order_by(Outbox.id).limit(limit).offset(offset)
        )
    )


def count_unsent(session: Session, state: str | None = None) -> int:
    states = [state] if state else list(UNSENT_STATES)
    return int(session.scalar(select(func.count()).select_from(Outbox).where(Outbox.state.in_(states))) or 0)


def delivery_counts(session: Session) -> list[dict[str, Any]]:
    """Deliveries by destination and state (every state, sent included)."""
    return [
        {"destination": d, "state": s, "count": n}
        for d, s, n in session.execute(
            select(Outbox.destination, Outbox.state, func.count())
            .group_by(Outbox.destination, Outbox.state)
            .order_by(Outbox.destination, Outbox.state)
        )
    ]


def _day(column: Any, dialect: str) -> Any:
    return func.date(column) if dialect == "sqlite" else func.to_char(column, "YYYY-MM-DD")


def costs(session: Session, since: dt.datetime, top: int = 20) -> dict[str, Any]:
    """Spend per day, per provider and model, and the most expensive studies, since ``since``."""
    dialect = session.get_bind().dialect.name
    day = _day(ApiCall.called_at, dialect)
    recent = ApiCall.called_at >= since
    per_day = [
        {"day": str(d), "calls": n, "cost_usd": float(c or 0.0)}
        for d, n, c in session.execute(
            select(day, func.count(), func.sum(ApiCall.cost_usd)).where(recent).group_by(day).order_by(day)
        )
    ]
    per_model = [
        {
            "provider": p,
            "model": m,
            "calls": n,
            "prompt_tokens": int(pt or 0),
            "completion_tokens": int(ct or 0),
            "cost_usd": float(c or 0.0),
        }
        for p, m, n, pt, ct, c in session.execute(
            select(
                ApiCall.provider,
                ApiCall.model,
                func.count(),
                func.sum(ApiCall.prompt_tokens),
                func.sum(ApiCall.completion_tokens),
                func.sum(ApiCall.cost_usd),
            )
            .where(recent)
            .group_by(ApiCall.provider, ApiCall.model)
            .order_by(func.sum(ApiCall.cost_usd).desc())
        )
    ]
    total = func.sum(ApiCall.cost_usd)
    per_study = [
        {"study_instance_uid": u, "calls": n, "cost_usd": float(c or 0.0)}
        for u, n, c in session.execute(
            select(ApiCall.study_instance_uid, func.count(), total)
            .where(recent)
            .group_by(ApiCall.study_instance_uid)
            .order_by(total.desc())
            .limit(top)
        )
    ]
    studies = int(
        session.scalar(select(func.count(func.distinct(ApiCall.study_instance_uid))).where(recent)) or 0
    )
    return {
        "per_day": per_day,
        "per_model": per_model,
        "per_study": per_study,
        "total_usd": sum(d["cost_usd"] for d in per_day),
        "studies": studies,
    }


def stuck_or_failing(session: Session) -> dict[str, int]:
    """Counts for the console's header: studies failed, deliveries dead-lettered or pending."""
    failed = session.scalar(select(func.count()).select_from(Study).where(Study.state == StudyState.FAILED))
    dead = session.scalar(select(func.count()).select_from(Outbox).where(Outbox.state == DeliveryState.DEAD))
    pending = session.scalar(
        select(func.count())
        .select_from(Outbox)
        .where(or_(Outbox.state == DeliveryState.PENDING, Outbox.state == DeliveryState.SENDING))
    )
    return {"failed": int(failed or 0), "dead": int(dead or 0), "pending": int(pending or 0)}
