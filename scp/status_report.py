"""``ainode status``: the studies the node holds, as a table or as JSON (DESIGN.md §3)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from storage.models import ApiCall, Job, Outbox, Study


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") if value is not None else None


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
    jobs: dict[str, Job | None] = {}
    for row in session.scalars(select(Job).order_by(Job.study_instance_uid, Job.study_version)):
        jobs[row.study_instance_uid] = row  # the newest version's job wins
    costs = dict(
        session.execute(  # type: ignore[arg-type]
            select(ApiCall.study_instance_uid, func.sum(ApiCall.cost_usd)).group_by(
                ApiCall.study_instance_uid
            )
        ).all()
    )
    disclosed: dict[str, list[dict[str, object]]] = {}
    for call in session.scalars(disclosure_query()):
        disclosed.setdefault(call.study_instance_uid, []).append(disclosure_record(call))
    sends: dict[str, list[dict[str, object]]] = {}
    for d, s, a, e, u, study_uid in session.execute(
        select(
            Outbox.destination,
            Outbox.state,
            Outbox.attempts,
            Outbox.last_error,
            Outbox.sr_sop_instance_uid,
            Outbox.study_instance_uid,
        ).order_by(Outbox.id)
    ):
        sends.setdefault(study_uid, []).append(
            {"destination": d, "state": s, "attempts": a, "last_error": e, "sr_sop_instance_uid": u}
        )
    rows: list[dict[str, Any]] = []
    for study in session.scalars(select(Study).order_by(Study.first_received_at)):
        job = jobs.get(study.study_instance_uid)
        current = job if job is not None and job.study_version == study.version else None
        rows.append(
            {
                "study_instance_uid": study.study_instance_uid,
                "state": study.state,
                "version": study.version,
                "instance_count": study.instance_count,
                "series_count": study.series_count,
                "calling_ae_title": study.calling_ae_title,
                "first_received_at": _iso(study.first_received_at),
                "last_received_at": _iso(study.last_received_at),
                "settle_at": _iso(study.settle_at),
                "attempts": current.attempts if current is not None else 0,
                "last_error": study.last_error or (current.last_error if current is not None else None),
                "sr_sop_instance_uid": study.sr_sop_instance_uid,
                "deliveries": sends.get(study.study_instance_uid, []),
                "disclosures": disclosed.get(study.study_instance_uid, []),
                "cost_usd": (
                    round(costs[study.study_instance_uid], 6) if study.study_instance_uid in costs else None
                ),
            }
        )
    return rows


def _problem(row: dict[str, Any]) -> str | None:
    """The study's own error, else the newest delivery error (a PACS that refuses or is down)."""
    if row["last_error"]:
        return str(row["last_error"])
    failing = [d for d in row["deliveries"] if d["last_error"]]
    if failing:
        newest = failing[-1]
        return f"{newest['destination']}: {newest['last_error']} (attempt {newest['attempts']})"
    return None


def format_table(rows: list[dict[str, Any]]) -> str:
    rows = [{**row, "problem": _problem(row)} for row in rows]
    columns = [
        ("study_instance_uid", "STUDY"),
        ("state", "STATE"),
        ("instance_count", "INST"),
        ("series_count", "SER"),
        ("calling_ae_title", "FROM"),
        ("last_received_at", "LAST RECEIVED"),
        ("attempts", "TRIES"),
        ("problem", "LAST ERROR"),
    ]
    table = [[h for _, h in columns]]
    table += [["" if r[k] is None else str(r[k]) for k, _ in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table
    )
