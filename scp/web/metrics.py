"""``/healthz`` and ``/metrics`` (Prometheus text format, written by ``prometheus-client``).

Metrics are read from the database at scrape time (a custom collector), so every process of a
scaled-out node reports the same numbers and nothing is lost on restart. No patient data:
states, counts, AE titles, providers. The names are the ones the node has always exported.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from conf import Settings
from storage.models import ApiCall, Instance, Job, JobState, Outbox, Study, utc_now

LATENCY_BUCKETS_MS = (250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class DatabaseCollector(Collector):
    """Every metric from one read of the database per scrape."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        with self.sessions() as session:
            yield from self._collect(session)

    def _collect(self, session: Session) -> Iterator[Metric]:
        now = utc_now()
        yield CounterMetricFamily(
            "ainode_instances_received",
            "Instances stored.",
            value=session.scalar(select(func.count(Instance.id))) or 0,
        )
        studies = GaugeMetricFamily("ainode_studies", "Studies by state.", labels=["state"])
        for state, n in session.execute(select(Study.state, func.count()).group_by(Study.state)):
            studies.add_metric([str(state)], n)
        yield studies
        depth, oldest = session.execute(
            select(func.count(Job.id), func.min(Job.created_at)).where(Job.state == JobState.QUEUED)
        ).one()
        yield GaugeMetricFamily("ainode_queue_depth", "Analysis jobs waiting.", value=depth)
        age = (now - oldest).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily(
            "ainode_queue_oldest_age_seconds", "Age of the oldest waiting job.", value=round(age, 3)
        )
        calls = session.execute(
            select(
                ApiCall.provider,
                ApiCall.status,
                func.count(),
                func.sum(ApiCall.prompt_tokens),
                func.sum(ApiCall.completion_tokens),
                func.sum(ApiCall.cost_usd),
            ).group_by(ApiCall.provider, ApiCall.status)
        ).all()
        by_status = CounterMetricFamily(
            "ainode_api_calls", "Vision API calls by provider and HTTP status.", labels=["provider", "status"]
        )
        tokens: dict[tuple[str, str], float] = {}
        cost: dict[str, float] = {}
        for provider, status, n, prompt, completion, dollars in calls:
            by_status.add_metric([provider, str(status) if status is not None else "none"], n)
            tokens[(provider, "input")] = tokens.get((provider, "input"), 0) + (prompt or 0)
            tokens[(provider, "output")] = tokens.get((provider, "output"), 0) + (completion or 0)
            cost[provider] = cost.get(provider, 0.0) + (dollars or 0.0)
        yield by_status
        billed = CounterMetricFamily("ainode_api_tokens", "Tokens billed.", labels=["provider", "kind"])
        for (provider, kind), value in tokens.items():
            billed.add_metric([provider, kind], value)
        yield billed
        spent = CounterMetricFamily(
            "ainode_api_cost_usd", "Cost of vision API calls in US dollars.", labels=["provider"]
        )
        for provider, value in cost.items():
            spent.add_metric([provider], round(value, 6))
        yield spent
        # Cumulative buckets counted in SQL: no row of api_calls is loaded.
        row = session.execute(
            select(
                *(func.sum(case((ApiCall.latency_ms <= bound, 1), else_=0)) for bound in LATENCY_BUCKETS_MS),
                func.count(ApiCall.id),
                func.sum(ApiCall.latency_ms),
            )
        ).one()
        count = int(row[-2] or 0)
        buckets: list[tuple[str, float]] = [
            (str(bound), int(n or 0)) for bound, n in zip(LATENCY_BUCKETS_MS, row[:-2], strict=True)
        ]
        buckets.append(("+Inf", count))
        yield HistogramMetricFamily(
            "ainode_api_latency_ms",
            "Vision API call latency.",
            buckets=buckets,
            sum_value=round(float(row[-1] or 0.0), 1),
        )
        deliveries = GaugeMetricFamily(
            "ainode_sr_deliveries", "SR deliveries by destination and state.", labels=["destination", "state"]
        )
        for destination, state, n in session.execute(
            select(Outbox.destination, Outbox.state, func.count()).group_by(Outbox.destination, Outbox.state)
        ):
            deliveries.add_metric([destination, str(state)], n)
        yield deliveries


def metrics_registry(sessions: sessionmaker[Session]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(sessions))
    return registry


def metrics_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def health(settings: Settings, sessions: sessionmaker[Session]) -> tuple[bool, dict[str, Any]]:
    """The ``/healthz`` report (DESIGN.md): database, disk, destinations, vision key."""
    report: dict[str, Any] = {}
    healthy = True
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        report["database"] = "ok"
    except Exception as exc:
        report["database"] = f"unreachable: {type(exc).__name__}"
        healthy = False
    free_mb = shutil.disk_usage(settings.storage.root).free // (1 << 20)
    report["disk_free_mb"] = free_mb
    if free_mb < settings.storage.min_free_mb:
        report["disk"] = f"below storage.min_free_mb ({settings.storage.min_free_mb})"
        healthy = False
    destinations = {}
    for destination in settings.destinations:
        try:
            with socket.create_connection(destination.address, timeout=1.0):
                destinations[destination.name] = "reachable"
        except OSError as exc:
            destinations[destination.name] = f"unreachable: {exc.strerror or type(exc).__name__}"
            healthy = False
    report["destinations"] = destinations
    report["vision"] = settings.vision.missing_key or "configured"
    if settings.vision.missing_key:
        healthy = False
    report["status"] = "ok" if healthy else "degraded"
    return healthy, report
