"""Recording vision API calls and summing their cost per study."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session

from storage.models import ApiCall


@dataclass(frozen=True)
class ApiCallRow:
    study_instance_uid: str
    provider: str
    model: str
    images: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_ms: float
    status: int | None
    error: str | None
    # What the request disclosed (storage.disclosures); None where no request left.
    endpoint_host: str | None = None
    image_sha256: str | None = None  # space-separated, in the order sent
    prompt_sha256: str | None = None
    request_sha256: str | None = None
    request_bytes: int | None = None
    sent_at: dt.datetime | None = None


def record_api_calls(
    session: Session, calls: Iterable[ApiCallRow], now: dt.datetime, job_id: int | None = None
) -> int:
    rows = [{**call.__dict__, "job_id": job_id, "called_at": now} for call in calls]
    if rows:
        session.execute(insert(ApiCall), rows)
    return len(rows)


def study_cost_usd(session: Session, study_instance_uid: str) -> float:
    total = session.scalar(
        select(func.coalesce(func.sum(ApiCall.cost_usd), 0.0)).where(
            ApiCall.study_instance_uid == study_instance_uid
        )
    )
    return float(total or 0.0)
