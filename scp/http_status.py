"""``/healthz`` and ``/metrics`` (Prometheus text format 0.0.4), served by ``ainode serve``.

Metrics are read from the database at scrape time, so every process of a scaled-out node
reports the same numbers and nothing is lost on restart. No patient data: states, counts, AE
titles, providers.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import threading
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from conf import Settings
from storage.models import ApiCall, Instance, Job, JobState, Outbox, Study, utc_now

log = logging.getLogger("ainode.http")
LATENCY_BUCKETS_MS = (250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _line(name: str, value: float, labels: dict[str, str] | None = None) -> str:
    label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in (labels or {}).items())
    return f"{name}{{{label_text}}} {value:g}" if label_text else f"{name} {value:g}"


def metrics_text(session: Session) -> str:
    now = utc_now()
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, lines: Iterable[str]) -> None:
        out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines])

    family(
        "ainode_instances_received_total",
        "counter",
        "Instances stored.",
        [_line("ainode_instances_received_total", session.scalar(select(func.count(Instance.id))) or 0)],
    )
    studies = session.execute(select(Study.state, func.count()).group_by(Study.state)).all()
    family(
        "ainode_studies",
        "gauge",
        "Studies by state.",
        [_line("ainode_studies", n, {"state": str(state)}) for state, n in studies],
    )
    queued = session.execute(
        select(func.count(Job.id), func.min(Job.created_at)).where(Job.state == JobState.QUEUED)
    ).one()
    family("ainode_queue_depth", "gauge", "Analysis jobs waiting.", [_line("ainode_queue_depth", queued[0])])
    oldest = (now - queued[1]).total_seconds() if queued[1] is not None else 0.0
    family(
        "ainode_queue_oldest_age_seconds",
        "gauge",
        "Age of the oldest waiting job.",
        [_line("ainode_queue_oldest_age_seconds", round(oldest, 3))],
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
    family(
        "ainode_api_calls_total",
        "counter",
        "Vision API calls by provider and HTTP status.",
        [
            _line("ainode_api_calls_total", n, {"provider": p, "status": str(s) if s is not None else "none"})
            for p, s, n, _, _, _ in calls
        ],
    )
    tokens: dict[tuple[str, str], float] = {}
    cost: dict[str, float] = {}
    for provider, _, _, prompt, completion, dollars in calls:
        tokens[(provider, "input")] = tokens.get((provider, "input"), 0) + (prompt or 0)
        tokens[(provider, "output")] = tokens.get((provider, "output"), 0) + (completion or 0)
        cost[provider] = cost.get(provider, 0.0) + (dollars or 0.0)
    family(
        "ainode_api_tokens_total",
        "counter",
        "Tokens billed.",
        [_line("ainode_api_tokens_total", v, {"provider": p, "kind": k}) for (p, k), v in tokens.items()],
    )
    family(
        "ainode_api_cost_usd_total",
        "counter",
        "Cost of vision API calls in US dollars.",
        [_line("ainode_api_cost_usd_total", round(v, 6), {"provider": p}) for p, v in cost.items()],
    )
    latencies = [row[0] for row in session.execute(select(ApiCall.latency_ms))]
    histogram = [
        _line("ainode_api_latency_ms_bucket", sum(1 for v in latencies if v <= bound), {"le": str(bound)})
        for bound in LATENCY_BUCKETS_MS
    ]
    histogram += [
        _line("ainode_api_latency_ms_bucket", len(latencies), {"le": "+Inf"}),
        _line("ainode_api_latency_ms_sum", round(sum(latencies), 1)),
        _line("ainode_api_latency_ms_count", len(latencies)),
    ]
    family("ainode_api_latency_ms", "histogram", "Vision API call latency.", histogram)
    deliveries = session.execute(
        select(Outbox.destination, Outbox.state, func.count()).group_by(Outbox.destination, Outbox.state)
    ).all()
    family(
        "ainode_sr_deliveries",
        "gauge",
        "SR deliveries by destination and state.",
        [_line("ainode_sr_deliveries", n, {"destination": d, "state": str(s)}) for d, s, n in deliveries],
    )
    return "\n".join(out) + "\n"


def health(settings: Settings, sessions: sessionmaker[Session]) -> tuple[bool, dict[str, Any]]:
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


class StatusServer:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s %s", self.command, format % args)

            def _send(self, status: int, body: str, content_type: str) -> None:
                data = body.encode("utf-8")
                self.send_response(status)
                self.send_header("content-type", content_type)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/healthz":
                    healthy, report = health(outer.settings, outer.sessions)
                    self._send(200 if healthy else 503, json.dumps(report), "application/json")
                elif self.path == "/metrics":
                    with outer.sessions() as session:
                        body = metrics_text(session)
                    self._send(200, body, "text/plain; version=0.0.4")
                else:
                    self._send(404, "not found\n", "text/plain")

        self.server = ThreadingHTTPServer((settings.http.host, settings.http.port), Handler)
        self.server.daemon_threads = True

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        threading.Thread(target=self.server.serve_forever, name="http", daemon=True).start()
        log.info(
            "health and metrics on http://%s:%d/healthz and /metrics", self.settings.http.host, self.port
        )

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
