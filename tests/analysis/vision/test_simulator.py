"""``ainode simulate-vision`` is a test peer: whatever a request holds, it answers over HTTP with
the status a real API would give, and never hangs, drops the connection or stops serving."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.nodes import simulator

CHAT, MESSAGES = "/v1/chat/completions", "/v1/messages"
TEXT = [{"role": "user", "content": "x"}]


def _exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` on a kept-alive connection and read one answer (its status line)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while b"\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n", 1)[0]


def _post(path: str, body: bytes, length: str | None = None) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: sim\r\nAuthorization: Bearer k\r\nx-api-key: k\r\n"
        f"anthropic-version: 2023-06-01\r\ncontent-length: {len(body) if length is None else length}\r\n\r\n"
    )
    return head.encode() + body


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _schema_format(schema: Any) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}


CASES = [
    ("content-length not a number", _post(CHAT, b"{}", "abc"), b"400"),
    ("negative content-length", _post(CHAT, b"{}", "-1"), b"400"),
    ("content-length of a terabyte", _post(CHAT, b"{}", str(10**12)), b"413"),
    ("JSON nested past the parser", _post(CHAT, b'{"m":' + b"[" * 100_000), b"400"),
    ("max_tokens a string", _post(CHAT, _json({"model": "m", "messages": TEXT, "max_tokens": "a"})), b"400"),
    ("max_tokens NaN", _post(CHAT, b'{"model":"m","messages":[],"max_tokens":NaN}'), b"400"),
    ("max_tokens 1e400", _post(CHAT, b'{"model":"m","messages":[],"max_tokens":1e400}'), b"400"),
    ("max_tokens true", _post(MESSAGES, _json({"model": "m", "messages": TEXT, "max_tokens": True})), b"400"),
    (
        "an empty enum",
        _post(CHAT, _json({"model": "m", "messages": TEXT, "response_format": _schema_format({"enum": []})})),
        b"200",
    ),
    (
        "an array of a billion items",
        _post(
            CHAT,
            _json(
                {
                    "model": "m",
                    "messages": TEXT,
                    "response_format": _schema_format({"type": "array", "minItems": 10**9}),
                }
            ),
        ),
        b"200",
    ),
    (
        "a schema in the messages nested past the parser",
        _post(
            CHAT,
            _json(
                {
                    "model": "m",
                    "messages": [{"role": "user", "content": "json " + '{"a":' * 5000}],
                    "response_format": {"type": "json_object"},
                }
            ),
        ),
        b"200",
    ),
    ("messages a string", _post(CHAT, _json({"model": "m", "messages": "hello"})), b"400"),
    (
        "tool_choice naming no tool",
        _post(
            MESSAGES,
            _json(
                {
                    "model": "m",
                    "max_tokens": 9,
                    "messages": TEXT,
                    "tool_choice": {"type": "tool", "name": "x"},
                }
            ),
        ),
        b"400",
    ),
]


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """One simulator for every case: each must leave it serving the next."""
    with simulator(tmp_path_factory.mktemp("simulator")) as url:
        number = urlsplit(url).port
        assert number is not None
        yield number


@pytest.mark.parametrize(("request_bytes", "status"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_request_gets_an_http_answer(port: int, request_bytes: bytes, status: bytes) -> None:
    assert _exchange(port, request_bytes).split(b" ")[1] == status
    assert _exchange(port, b"GET /healthz HTTP/1.1\r\nHost: sim\r\n\r\n").endswith(b"200 OK")
