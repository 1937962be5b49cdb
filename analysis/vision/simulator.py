"""``ainode simulate-vision``: a local endpoint speaking the OpenAI chat-completions protocol.

It answers with schema-valid findings in which every text starts with "SIMULATED", so a site
can wire up PACS routing and check how the SR displays before it pays for a model, and tests
can run the real client over real HTTP. It can be told to misbehave for its first calls: 429
with Retry-After, 500, malformed content, any other status, an exhausted quota; to be slow; to
enforce a requests-per-minute limit; and to record every request body for privacy checks.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

log = logging.getLogger("ainode.simulator")
SIMULATED_MODEL = "ainode-simulated-vision"


@dataclass(frozen=True)
class Behaviour:
    latency_ms: float = 0.0
    fail_429: int = 0  # the first N calls answer 429 with Retry-After
    retry_after_seconds: float = 1.0
    fail_500: int = 0  # then M calls answer 500
    malformed: int = 0  # then K calls answer 200 with content that is not valid findings
    fail_status: int = 0  # then this status (e.g. 401) for fail_status_count calls
    fail_status_count: int = 0
    quota_exhausted: bool = False  # every call: 429 insufficient_quota
    rpm_limit: int = 0  # answer 429 past this many requests in a rolling minute
    record: Path | None = None  # append every request body here, one JSON per line


def simulated_findings(images: int) -> dict[str, Any]:
    return {
        "study_quality": "diagnostic",
        "summary": "SIMULATED findings from ainode simulate-vision: no model looked at these images.",
        "overall_urgency": 2,
        "findings": [
            {
                "description": "SIMULATED: rounded opacity, placed to check region display",
                "body_site": "SIMULATED: right upper lobe",
                "laterality": "right",
                "image_index": 1,
                "box": {"x_min": 0.30, "y_min": 0.30, "x_max": 0.45, "y_max": 0.42},
                "confidence": 0.5,
                "severity": "mild",
                "recommendation": "SIMULATED: no action; this is a wiring test.",
            }
        ]
        if images
        else [],
    }


class _State:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour
        self.calls = 0
        self.recent: deque[float] = deque()
        self.lock = threading.Lock()

    def next_call(self) -> tuple[int, bool]:
        """The call's number (1-based) and whether the minute's limit is exceeded."""
        with self.lock:
            self.calls += 1
            now = time.monotonic()
            while self.recent and now - self.recent[0] >= 60:
                self.recent.popleft()
            limited = bool(self.behaviour.rpm_limit) and len(self.recent) >= self.behaviour.rpm_limit
            if not limited:
                self.recent.append(now)
            return self.calls, limited


class _Handler(BaseHTTPRequestHandler):
    server: SimulatorServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # one line per request, no content
        log.info("%s %s", self.command, format % args)

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/healthz", "/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [{"id": SIMULATED_MODEL, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length", "0"))
        raw = self.rfile.read(length)
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
            return
        state = self.server.state
        b = state.behaviour
        if b.record is not None:
            with state.lock, b.record.open("ab") as fh:
                fh.write(raw.replace(b"\n", b" ") + b"\n")
        try:
            body = json.loads(raw)
            images = sum(
                1
                for message in body["messages"]
                if isinstance(message.get("content"), list)
                for part in message["content"]
                if part.get("type") == "image_url"
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            self._send(
                400,
                {
                    "error": {
                        "message": "body is not a chat-completions request",
                        "type": "invalid_request_error",
                    }
                },
            )
            return
        call, limited = state.next_call()
        if b.latency_ms:
            time.sleep(b.latency_ms / 1000)
        retry = {"retry-after": f"{b.retry_after_seconds:g}"}
        if b.quota_exhausted:
            self._send(
                429,
                {
                    "error": {
                        "message": "You exceeded your current quota.",
                        "type": "insufficient_quota",
                        "code": "insufficient_quota",
                    }
                },
            )
            return
        if limited:
            self._send(
                429,
                {"error": {"message": "rate limit", "type": "rate_limit_exceeded"}},
                {**retry, "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"},
            )
            return
        if call <= b.fail_429:
            self._send(
                429, {"error": {"message": "simulated rate limit", "type": "rate_limit_exceeded"}}, retry
            )
            return
        call -= b.fail_429
        if call <= b.fail_500:
            self._send(500, {"error": {"message": "simulated server error", "type": "server_error"}})
            return
        call -= b.fail_500
        content = json.dumps(simulated_findings(images))
        if call <= b.malformed:
            content = '{"study_quality": "SIMULATED malformed", "findings": "not a list"'
        call -= b.malformed
        if 0 < call <= b.fail_status_count and b.fail_status:
            self._send(
                b.fail_status, {"error": {"message": f"simulated {b.fail_status}", "type": "simulated"}}
            )
            return
        prompt_tokens = 85 + 170 * 4 * images + len(raw) // 400
        completion_tokens = len(content) // 4
        self._send(
            200,
            {
                "id": f"chatcmpl-sim-{state.calls}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", SIMULATED_MODEL),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
            {"x-ratelimit-limit-requests": str(b.rpm_limit or 10_000)},
        )


class SimulatorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], behaviour: Behaviour) -> None:
        super().__init__(address, _Handler)
        self.state = _State(behaviour)

    @property
    def port(self) -> int:
        return int(self.server_address[1])
