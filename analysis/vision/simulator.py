"""``ainode simulate-vision``: a local endpoint speaking OpenAI chat completions
(``/v1/chat/completions``) and Anthropic Messages (``/v1/messages``).

It answers like a model, only from what each request shows (:mod:`analysis.vision.simulated_model`),
with every text saying SIMULATED, so a site can wire up PACS routing and check how the SR displays
before it pays for a model, and tests can run the real client over real HTTP against a peer as
strict as the real APIs. It can be told to misbehave for its first calls: 429 with Retry-After,
500, malformed content, any other status, refusals, an exhausted quota; to answer in fences,
after prose, at the schema's edges, or past ``max_tokens``; to be slow; to enforce a
requests-per-minute limit and a key; and to record every request body for privacy checks.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from analysis.finding_codes import GENERAL_CODES, CodeList
from analysis.findings import findings_schema
from analysis.vision.simulated_model import (
    REFUSAL,
    SIMULATED_MODEL,
    Answering,
    RequestRejected,
    anthropic_answer,
    cut,
    instance,
    openai_answer,
    tokens,
    write,
)

log = logging.getLogger("ainode.simulator")
MAX_BODY_BYTES = 64 * 1024 * 1024  # over every preset's max_bytes_per_request


@dataclass(frozen=True)
class Behaviour:
    latency_ms: float = 0.0
    fail_429: int = 0  # the first N calls answer 429 with Retry-After
    retry_after_seconds: float = 1.0
    fail_500: int = 0  # then M calls answer 500
    malformed: int = 0  # then K calls answer 200 with content that is not valid findings
    fail_status: int = 0  # then this status (e.g. 401) for fail_status_count calls
    fail_status_count: int = 0
    refuse: int = 0  # then R answered calls are refusals
    quota_exhausted: bool = False  # every call: 429 insufficient_quota
    rpm_limit: int = 0  # answer 429 past this many requests in a rolling minute
    api_key: str | None = None  # when set, a request must carry exactly this key
    drip_ms: float = 0.0  # send each reply body 64 bytes at a time, this long apart
    record: Path | None = None  # append every request body here, one JSON per line
    answering: Answering = field(default_factory=Answering)


def simulated_findings(
    images: int, answering: Answering | None = None, codes: CodeList = GENERAL_CODES
) -> dict[str, Any]:
    """What the simulator answers to a request for ``images`` 512 x 512 images in the fraction
    convention offering ``codes``: an instance of the schema such a request carries."""
    if not images:
        return {
            "study_quality": "diagnostic",
            "summary": "SIMULATED findings from ainode simulate-vision: no model looked at these images.",
            "overall_urgency": 1,
            "findings": [],
        }
    schema = findings_schema([(512, 512)] * images, "fraction", codes)
    value: dict[str, Any] = instance(schema, answering or Answering())
    return value


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
        drip = self.server.state.behaviour.drip_ms
        if drip:  # a server that answers, slowly: every read is quick, the whole is not
            for start in range(0, len(data), 64):
                self.wfile.write(data[start : start + 64])
                self.wfile.flush()
                time.sleep(drip / 1000)
            return
        self.wfile.write(data)

    def _error(
        self, status: int, kind: str, message: str, headers: dict[str, str] | None = None, code: str = ""
    ) -> None:
        """An error body in the wire format the path speaks."""
        if self.path.rstrip("/").endswith("/messages"):
            self._send(status, {"type": "error", "error": {"type": kind, "message": message}}, headers)
        else:
            error = {"message": message, "type": kind, **({"code": code} if code else {})}
            self._send(status, {"error": error}, headers)

    def do_GET(self) -> None:
        if self.path.rstrip("/") in ("/healthz", "/v1/models", "/models"):
            self._send(200, {"object": "list", "data": [{"id": SIMULATED_MODEL, "object": "model"}]})
        else:
            self._error(404, "not_found", f"no route {self.path}")

    def _key(self) -> str | None:
        if self.path.rstrip("/").endswith("/messages"):
            return self.headers.get("x-api-key")
        auth = self.headers.get("authorization", "")
        return auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None

    def do_POST(self) -> None:
        """Every request gets an HTTP answer, whatever it holds: a test peer that hangs or drops
        the connection would hide what the client does with a real answer."""
        try:
            self._post()
        except Exception as exc:
            log.exception("simulator: request not handled")
            self.close_connection = True
            self._error(500, "server_error", f"the simulator could not answer: {type(exc).__name__}")

    def _body(self) -> bytes | None:
        """The request body, or None when an error was answered (length not a number, negative or
        over MAX_BODY_BYTES: the connection is closed, the body is never read)."""
        try:
            length = int(self.headers.get("content-length") or "0")
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._error(400, "invalid_request_error", "content-length is not a byte count")
            return None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(413, "request_too_large", f"the body is over {MAX_BODY_BYTES} bytes")
            return None
        return self.rfile.read(length)

    def _post(self) -> None:
        raw = self._body()
        if raw is None:
            return
        path = self.path.rstrip("/")
        anthropic = path.endswith("/messages")
        if not (anthropic or path.endswith("/chat/completions")):
            self._error(404, "not_found", f"no route {self.path}")
            return
        state = self.server.state
        b = state.behaviour
        if b.record is not None:
            with state.lock, b.record.open("ab") as fh:
                fh.write(raw.replace(b"\n", b" ") + b"\n")
        key = self._key()
        if (anthropic and not key) or (b.api_key is not None and key != b.api_key):
            self._error(
                401, "authentication_error", "invalid x-api-key" if anthropic else "Incorrect API key"
            )
            return
        tool: str | None = None
        try:
            body = json.loads(raw)
            if anthropic:
                headers = {name.lower(): value for name, value in self.headers.items()}
                value, tool, images = anthropic_answer(body, headers, b.answering)
            else:
                value, images = openai_answer(body, b.answering)
        except RequestRejected as exc:
            self._error(exc.status, exc.kind, str(exc))
            return
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            self._error(400, "invalid_request_error", f"could not read the request: {type(exc).__name__}")
            return
        call, limited = state.next_call()
        if b.latency_ms:
            time.sleep(b.latency_ms / 1000)
        retry = {"retry-after": f"{b.retry_after_seconds:g}"}
        if b.quota_exhausted:
            self._error(
                429, "insufficient_quota", "You exceeded your current quota.", code="insufficient_quota"
            )
            return
        if limited:
            self._error(
                429,
                "rate_limit_exceeded",
                "rate limit",
                {**retry, "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"},
            )
            return
        if call <= b.fail_429:
            self._error(429, "rate_limit_exceeded", "simulated rate limit", retry)
            return
        call -= b.fail_429
        if call <= b.fail_500:
            self._error(500, "server_error", "simulated server error")
            return
        call -= b.fail_500
        # A tool's input is structured: fences and prose belong to text answers only.
        content = write(value, replace(b.answering, style="plain") if tool else b.answering)
        if call <= b.malformed:
            content = '{"study_quality": "SIMULATED malformed", "findings": "not a list"'
            tool = None
        call -= b.malformed
        if 0 < call <= b.fail_status_count and b.fail_status:
            self._error(b.fail_status, "simulated", f"simulated {b.fail_status}")
            return
        call -= b.fail_status_count if b.fail_status else 0
        refused = 0 < call <= b.refuse
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or 1 << 30
        content, truncated = cut(content, max_tokens)
        prompt_tokens = 85 + 170 * 4 * images + len(raw) // 400
        completion_tokens = tokens(REFUSAL if refused else content)
        if anthropic:
            self._send(
                200,
                self._anthropic(body, content, tool, truncated, refused, prompt_tokens, completion_tokens),
            )
            return
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if refused:
            message = {"role": "assistant", "content": None, "refusal": REFUSAL}
        self._send(
            200,
            {
                "id": f"chatcmpl-sim-{state.calls}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", SIMULATED_MODEL),
                "choices": [
                    {"index": 0, "message": message, "finish_reason": "length" if truncated else "stop"}
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            },
            {"x-ratelimit-limit-requests": str(b.rpm_limit or 10_000)},
        )

    def _anthropic(
        self,
        body: dict[str, Any],
        content: str,
        tool: str | None,
        truncated: bool,
        refused: bool,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> dict[str, Any]:
        """A Messages API reply: a tool_use block (its input cut short when over max_tokens, as
        the real API leaves it), a text block, or a refusal."""
        stop = "refusal" if refused else "max_tokens" if truncated else "tool_use" if tool else "end_turn"
        if refused:
            blocks: list[dict[str, Any]] = [{"type": "text", "text": REFUSAL}]
        elif tool is not None and not truncated:
            blocks = [{"type": "tool_use", "id": "toolu_sim", "name": tool, "input": json.loads(content)}]
        elif tool is not None:
            blocks = [{"type": "tool_use", "id": "toolu_sim", "name": tool, "input": {}}]
        else:
            blocks = [{"type": "text", "text": content}]
        return {
            "id": "msg_sim",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", SIMULATED_MODEL),
            "content": blocks,
            "stop_reason": stop,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": completion_tokens},
        }


class SimulatorServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], behaviour: Behaviour) -> None:
        super().__init__(address, _Handler)
        self.state = _State(behaviour)

    @property
    def port(self) -> int:
        return int(self.server_address[1])
