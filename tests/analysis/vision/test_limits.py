"""Rate limiter and circuit breaker with a driven clock: no sleeping."""

from __future__ import annotations

import datetime as dt

import pytest

from analysis.vision.limits import CircuitBreaker, RateLimiter, parse_reset


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_requests_per_minute_never_exceeded_over_any_minute() -> None:
    t = FakeTime()
    limiter = RateLimiter(60, 0, clock=t.clock, sleep=t.sleep)
    sent: list[float] = []
    for _ in range(200):
        limiter.acquire(0)
        sent.append(t.now)
    # 60 at once, then the next 60 a minute later, and so on: never 61 in any 60 s.
    assert sent[59] == 0.0 and sent[60] == pytest.approx(60.251)
    for i in range(200):
        assert sum(1 for s in sent if sent[i] - 60 < s <= sent[i]) <= 60
    assert sent[-1] == pytest.approx(180.753)


def test_tokens_per_minute_hold_a_large_request_back() -> None:
    t = FakeTime()
    limiter = RateLimiter(0, 10_000, clock=t.clock, sleep=t.sleep)
    limiter.acquire(8_000)
    waited = limiter.acquire(8_000)
    assert waited == pytest.approx(60.251)  # the first 8,000 must age out of the window


def test_rate_limit_headers_hold_requests_until_the_reset() -> None:
    t = FakeTime()
    limiter = RateLimiter(600, 0, clock=t.clock, sleep=t.sleep)
    limiter.observe({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"})
    limiter.acquire(0)
    assert t.now == pytest.approx(360.001)


def test_reset_header_formats() -> None:
    assert parse_reset("1s") == 1.0 and parse_reset("6m0s") == 360.0 and parse_reset("20ms") == 0.02
    assert parse_reset("1h2m3s") == 3723.0
    now = dt.datetime(2026, 1, 1, 12, 0, tzinfo=dt.UTC)
    assert parse_reset("2026-01-01T12:00:30Z", now) == 30.0
    assert parse_reset("soon") is None


def test_circuit_opens_half_opens_and_closes() -> None:
    t = FakeTime()
    breaker = CircuitBreaker(threshold=3, cooldown=30, clock=t.clock)
    for _ in range(3):
        assert breaker.allow()
        breaker.failed()
    assert breaker.state == "open" and not breaker.allow()
    t.now = 31
    assert breaker.state == "half-open"
    assert breaker.allow() and not breaker.allow()  # exactly one trial call
    breaker.failed()
    assert breaker.state == "open"
    t.now = 62
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.allow()
