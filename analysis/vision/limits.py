"""Client-side limits: requests and tokens per minute, and a circuit breaker.

Clocks and sleeps are passed in so tests drive time instead of waiting for it.
"""

from __future__ import annotations

import datetime as dt
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

Clock = Callable[[], float]
Sleep = Callable[[float], None]


class SlidingWindow:
    """At most ``per_minute`` units in any rolling 60 s: the way providers count, so a client
    that keeps to it is never the one that gets the 429."""

    # Requests are stamped as they leave; the server stamps them as they arrive, a little later.
    # A quarter second of slack keeps the two windows from disagreeing at the edge.
    MARGIN_SECONDS = 0.25

    def __init__(self, per_minute: float, clock: Clock = time.monotonic) -> None:
        if per_minute <= 0:
            raise ValueError(f'Argument "per_minute" must be positive, got {per_minute}')
        self.limit = float(per_minute)
        self.clock = clock
        self.spent: deque[tuple[float, float]] = deque()  # (when, amount)
        self.hold_until = 0.0

    def wait_time(self, amount: float) -> float:
        """Seconds until ``amount`` more fits in the window (0 when it fits now)."""
        now = self.clock()
        while self.spent and self.spent[0][0] <= now - 60:
            self.spent.popleft()
        wait = max(self.hold_until - now, 0.0)
        amount = min(amount, self.limit)
        used = sum(a for _, a in self.spent)
        for when, spent_amount in self.spent:  # oldest first: wait until enough has aged out
            if used + amount <= self.limit:
                break
            used -= spent_amount
            wait = max(wait, when + 60 + self.MARGIN_SECONDS - now)
        return wait

    def take(self, amount: float) -> None:
        self.spent.append((self.clock(), min(amount, self.limit)))

    def hold(self, seconds_from_now: float) -> None:
        """The server says none are left until then."""
        self.hold_until = max(self.hold_until, self.clock() + seconds_from_now)


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?$")


def parse_reset(value: str, now: dt.datetime | None = None) -> float | None:
    """A rate-limit reset header in seconds from now: OpenAI durations ("1s", "6m0s", "20ms")
    or Anthropic RFC 3339 times."""
    value = value.strip()
    match = _DURATION.match(value)
    if value and match and any(match.groups()):
        h, m, s, ms = (float(g) if g else 0.0 for g in match.groups())
        return h * 3600 + m * 60 + s + ms / 1000
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    reference = now or dt.datetime.now(dt.UTC)
    return max((moment - reference).total_seconds(), 0.0)


class RateLimiter:
    """Requests and tokens per minute for one provider, shared by every call in the process,
    and fed by the provider's rate-limit headers."""

    def __init__(
        self,
        requests_per_minute: int,
        tokens_per_minute: int,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
    ) -> None:
        self.requests = SlidingWindow(requests_per_minute, clock) if requests_per_minute else None
        self.tokens = SlidingWindow(tokens_per_minute, clock) if tokens_per_minute else None
        self.sleep = sleep
        self.lock = threading.Lock()

    def acquire(self, tokens: int) -> float:
        """Block until one request and ``tokens`` tokens may go; return the seconds waited."""
        waited = 0.0
        while True:
            with self.lock:
                wait = max(
                    self.requests.wait_time(1) if self.requests else 0.0,
                    self.tokens.wait_time(tokens) if self.tokens else 0.0,
                )
                if wait <= 0:
                    if self.requests:
                        self.requests.take(1)
                    if self.tokens:
                        self.tokens.take(tokens)
                    return waited
            self.sleep(wait + 0.001)  # just past the edge, so the next look finds room
            waited += wait + 0.001

    def observe(self, response_headers: Mapping[str, str]) -> None:
        """Honour what the server says is left (OpenAI ``x-ratelimit-*``, Anthropic
        ``anthropic-ratelimit-*``)."""
        for bucket, kind in ((self.requests, "requests"), (self.tokens, "tokens")):
            if bucket is None:
                continue
            for remaining_key, reset_key in (
                (f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}"),
                (f"anthropic-ratelimit-{kind}-remaining", f"anthropic-ratelimit-{kind}-reset"),
            ):
                remaining, reset = response_headers.get(remaining_key), response_headers.get(reset_key)
                if remaining is not None and reset is not None and remaining.strip() == "0":
                    seconds = parse_reset(reset)
                    if seconds:
                        with self.lock:
                            bucket.hold(seconds)


class CircuitBreaker:
    """Closed; after ``threshold`` failures in a row, open for ``cooldown`` seconds; then
    half-open: one trial call, which closes it on success or opens it again on failure."""

    def __init__(self, threshold: int, cooldown: float, clock: Clock = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.failures = 0
        self.last_failure = ""  # what the last failure was, for the reason a study waits
        self.open_until: float | None = None
        self.trial_running = False
        self.lock = threading.Lock()

    def allow(self) -> bool:
        with self.lock:
            if self.open_until is None:
                return True
            if self.clock() < self.open_until or self.trial_running:
                return False
            self.trial_running = True  # half-open: let exactly one call through
            return True

    def succeeded(self) -> None:
        with self.lock:
            self.failures, self.open_until, self.trial_running = 0, None, False

    def abandoned(self) -> None:
        """The call let through was never made (its disclosure could not be recorded): it says
        nothing of the provider; a half-open trial is over, so the next call may be the trial."""
        with self.lock:
            self.trial_running = False

    def failed(self, reason: str = "") -> None:
        with self.lock:
            self.failures += 1
            self.last_failure = reason or self.last_failure
            self.trial_running = False
            if self.failures >= self.threshold:
                self.open_until = self.clock() + self.cooldown

    @property
    def state(self) -> str:
        with self.lock:
            if self.open_until is None:
                return "closed"
            return "open" if self.clock() < self.open_until else "half-open"
