"""The vision client: one study's images and prompt in, validated findings out.

Reliability: connect/read timeouts; retries on 408, 409, 429, 5xx and connection errors with
exponential backoff and full jitter, honouring ``retry-after`` / ``retry-after-ms``; no retry on
400, 401, 403 or quota errors; a per-provider rate limiter fed by the response headers; a
bounded number of calls in flight; a circuit breaker. Every call, failed or not, is returned as
a :class:`CallRecord` for the ``api_calls`` table. The API key is sent, never logged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from analysis.encode import EncodedImage
from analysis.errors import (
    BudgetExceeded,
    CircuitOpen,
    InvalidFindings,
    ModelRefused,
    VisionPermanent,
    VisionRetryable,
)
from analysis.finding_codes import GENERAL_CODES, CodeList
from analysis.findings import Findings
from analysis.vision import wire
from analysis.vision.limits import CircuitBreaker, RateLimiter
from analysis.vision.reading import UnusableReply, extract_json, read_findings
from analysis.vision.tokens import IMAGE_TOKEN_FORMULAS
from conf import VisionSettings
from conf.providers import ProviderPreset, preset_for
from storage.api_calls import ApiCallRow
from storage.disclosures import Disclosure, DisclosureLog, DisclosureNotRecorded

log = logging.getLogger("ainode.vision")
RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
# Failures before a connection existed to write to (refused, unreachable, TLS handshake, no free
# pooled connection): not a byte of the request left.
NEVER_LEFT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
QUOTA_CODES = ("insufficient_quota", "billing_hard_limit_reached", "quota_exceeded")


CallRecord = ApiCallRow  # one call, as the api_calls table keeps it


@dataclass
class VisionResult:
    findings: Findings
    raw_reply: str
    calls: list[CallRecord] = field(default_factory=list)

    @property
    def cost_usd(self) -> float:
        return sum(call.cost_usd for call in self.calls)


class ReplyTooLarge(httpx.TransportError):
    """The provider's reply is larger than ``vision.max_reply_bytes``."""


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat[:limit] + ("..." if len(flat) > limit else "")


def _retry_after(response: httpx.Response) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = response.headers.get(name)
        if value:
            try:
                return max(float(value) * scale, 0.0)
            except ValueError:
                continue
    return None


def _error_code(response: httpx.Response) -> str:
    try:
        error = response.json().get("error", {})
    except (ValueError, AttributeError):
        return ""
    if isinstance(error, dict):
        return str(error.get("code") or error.get("type") or "")
    return ""


class VisionClient:
    """Thread-safe: the limiter, breaker and in-flight cap are shared by every study."""

    def __init__(
        self,
        settings: VisionSettings,
        http: httpx.Client | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        disclosures: DisclosureLog | None = None,
    ) -> None:
        """``disclosures``: the audit log every request is written to before it is sent."""
        self.settings = settings
        self.disclosures = disclosures
        self.preset: ProviderPreset = preset_for(settings.provider)
        self.model = settings.model or self.preset.default_model
        self.base_url = settings.base_url or self.preset.base_url
        self.http = http or httpx.Client(
            timeout=httpx.Timeout(settings.timeout_seconds, connect=settings.connect_timeout_seconds)
        )
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.limiter = RateLimiter(settings.requests_per_minute, settings.tokens_per_minute, sleep=sleep)
        self.breaker = CircuitBreaker(settings.circuit_failure_threshold, settings.circuit_cooldown_seconds)
        self.in_flight = threading.BoundedSemaphore(settings.max_concurrency)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> VisionClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- estimates ---------------------------------------------------------------------------

    def estimate_tokens(
        self, images: list[EncodedImage], prompt: str, codes: CodeList = GENERAL_CODES
    ) -> int:
        formula = IMAGE_TOKEN_FORMULAS[self.preset.token_formula]
        schema = wire.request_schema(self.preset, images, codes)
        system = wire.system_message(self.preset, schema)
        text = (len(prompt) + len(system) + len(json.dumps(schema))) // 4
        return sum(formula(image.width, image.height) for image in images) + text

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.preset.price_input_per_mtok
            + completion_tokens * self.preset.price_output_per_mtok
        ) / 1_000_000

    # -- the call ----------------------------------------------------------------------------

    def analyse(
        self,
        study_instance_uid: str,
        images: list[EncodedImage],
        prompt: str,
        spent_usd: float = 0.0,
        codes: CodeList = GENERAL_CODES,
    ) -> VisionResult:
        """Findings for one study (:meth:`_analyse`); any error leaves with the calls made so
        far in ``.calls``, so the caller can record what was spent. ``spent_usd``: what the study
        already cost (earlier attempts and versions), counted against its budget. ``codes``: the
        closed list of SNOMED CT codes of the study's body region, the only codes the schema
        offers and the reply may keep (:mod:`analysis.finding_codes`)."""
        calls: list[CallRecord] = []
        try:
            return self._analyse(study_instance_uid, images, prompt, calls, spent_usd, codes)
        except Exception as exc:
            if not hasattr(exc, "calls"):
                self._tag(exc, calls)
            raise

    def _analyse(
        self,
        study_instance_uid: str,
        images: list[EncodedImage],
        prompt: str,
        calls: list[CallRecord],
        spent_usd: float,
        codes: CodeList,
    ) -> VisionResult:
        """Findings for one study: raises :class:`VisionPermanent` or :class:`VisionRetryable`
        (with ``.calls`` set) when there are none.

        At most three answered requests: the question; once more with twice the ``max_tokens``
        if the reply was cut at the limit; one repair request if the reply has no usable
        structure (:mod:`analysis.vision.reading`). A refusal is final."""
        estimate = self.estimate_tokens(images, prompt, codes)
        max_tokens = self.settings.max_output_tokens
        worst_cost = self.cost(estimate, max_tokens) + 2 * self.cost(estimate, 2 * max_tokens)
        if spent_usd + worst_cost > self.settings.max_cost_usd_per_study:
            spent = f"${spent_usd:.4f} spent already and " if spent_usd else ""
            raise self._tag(
                BudgetExceeded(
                    f"study {study_instance_uid}: {spent}estimated up to ${worst_cost:.4f} ({estimate} input "
                    "tokens a request), over vision.max_cost_usd_per_study "
                    f"${self.settings.max_cost_usd_per_study}"
                ),
                calls,
            )
        sizes = [(image.width, image.height) for image in images]
        history: list[tuple[str, str]] = []
        extended = repaired = False
        while True:
            reply = self._send_with_retries(
                study_instance_uid, images, prompt, history, estimate, calls, max_tokens, codes
            )
            if reply.refusal is not None:
                raise self._tag(
                    ModelRefused(
                        f"study {study_instance_uid}: the model declined to answer: "
                        + _one_line(reply.refusal)
                    ),
                    calls,
                )
            if reply.truncated:
                if extended:
                    raise self._tag(
                        InvalidFindings(
                            f"study {study_instance_uid}: the reply was cut at max_tokens {max_tokens} "
                            "twice; raise vision.max_output_tokens",
                            reply.content,
                        ),
                        calls,
                    )
                extended = True
                max_tokens *= 2
                log.warning(
                    "study %s: reply cut at the token limit; asking again with max_tokens %d",
                    study_instance_uid,
                    max_tokens,
                )
                continue
            try:
                findings = read_findings(
                    extract_json(reply.content), sizes, self.preset.box_convention, codes
                )
            except UnusableReply as exc:
                if repaired:
                    raise self._tag(
                        InvalidFindings(
                            f"study {study_instance_uid}: no usable findings after a repair request: {exc}",
                            reply.content,
                        ),
                        calls,
                    ) from None
                repaired = True
                log.warning(
                    "study %s: reply unusable (%s); asking once for a corrected reply",
                    study_instance_uid,
                    exc,
                )
                history.append(
                    (
                        reply.content,
                        "Your reply could not be used: "
                        f"{exc}. Reply again with only one JSON object that follows the required schema.",
                    )
                )
                continue
            return VisionResult(findings, reply.content, calls)

    def _post(self, url: str, payload: bytes, headers: dict[str, str]) -> httpx.Response:
        """POST and read the reply within ``vision.request_deadline_seconds`` in all and at most
        ``vision.max_reply_bytes``: the per-read timeouts alone let a server that drips a byte at
        a time hold a request (and the study's lease) for ever."""
        deadline = time.monotonic() + self.settings.request_deadline_seconds
        limit = self.settings.max_reply_bytes
        with self.http.stream("POST", url, content=payload, headers=headers) as streamed:
            body = bytearray()
            for chunk in streamed.iter_bytes():
                body += chunk
                if len(body) > limit:
                    raise ReplyTooLarge(
                        f"reply over vision.max_reply_bytes ({limit})", request=streamed.request
                    )
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout(
                        f"no complete reply within vision.request_deadline_seconds "
                        f"({self.settings.request_deadline_seconds:g})",
                        request=streamed.request,
                    )
            return httpx.Response(
                streamed.status_code, headers=streamed.headers, content=bytes(body), request=streamed.request
            )

    def _tag(self, error: Exception, calls: list[CallRecord]) -> Exception:
        error.calls = calls  # type: ignore[attr-defined]
        return error

    def _backoff(self, attempt: int) -> float:
        cap = min(self.settings.backoff_cap_seconds, self.settings.backoff_base_seconds * 2**attempt)
        return self.rng.uniform(0, cap)  # full jitter

    def _send_with_retries(
        self,
        study: str,
        images: list[EncodedImage],
        prompt: str,
        history: list[tuple[str, str]],
        estimate: int,
        calls: list[CallRecord],
        max_tokens: int,
        codes: CodeList,
    ) -> wire.Reply:
        body = wire.build_body(
            self.preset, self.model, images, prompt, max_tokens, self.settings.temperature, history, codes
        )
        payload = json.dumps(body).encode("utf-8")
        url = wire.endpoint(self.preset, self.base_url)
        api_key = self.settings.api_key.get_secret_value() if self.settings.api_key else None
        headers = wire.headers(self.preset, api_key)
        last_error = "no attempt made"
        for attempt in range(self.settings.max_retries + 1):
            disclosed: Disclosure | None = None
            if not self.breaker.allow():
                cause = self.breaker.last_failure or "no answer"
                raise self._tag(
                    CircuitOpen(
                        f"{self.preset.name} is failing ({cause}); circuit open after "
                        f"{self.breaker.failures} failures in a row, not calling for "
                        f"{self.settings.circuit_cooldown_seconds:g} s"
                    ),
                    calls,
                )
            status: int | None = None
            delay: float | None = None
            started = time.perf_counter()
            try:
                with self.in_flight:
                    # Count the request when it really leaves, not while it waits for a slot.
                    self.limiter.acquire(estimate + max_tokens)
                    try:
                        disclosed = self._disclose(study, images, prompt, url, payload)
                    except VisionRetryable:
                        self.breaker.abandoned()  # not sent: no verdict on the provider
                        raise
                    started = time.perf_counter()
                    response = self._post(url, payload, headers)
                status = response.status_code
                latency = (time.perf_counter() - started) * 1000
                self.limiter.observe(response.headers)
                if status == 200:
                    try:
                        reply = wire.parse_reply(self.preset, response.json())
                    except (ValueError, RecursionError, wire.ReplyFormatError) as exc:
                        # RecursionError: JSON nested deeper than the interpreter's limit.
                        last_error = (
                            f"HTTP 200 with an unreadable body: {type(exc).__name__}: {str(exc)[:200]}"
                        )
                        self._record(calls, study, images, 0, 0, latency, status, last_error, disclosed)
                        self.breaker.failed(last_error)
                        delay = self._backoff(attempt)
                    else:
                        self._record(
                            calls,
                            study,
                            images,
                            reply.prompt_tokens,
                            reply.completion_tokens,
                            latency,
                            status,
                            None,
                            disclosed,
                        )
                        self.breaker.succeeded()
                        return reply
                else:
                    code = _error_code(response)
                    last_error = f"HTTP {status}{' ' + code if code else ''}"
                    self._record(calls, study, images, 0, 0, latency, status, last_error, disclosed)
                    if status in RETRYABLE_STATUSES and not any(q in code for q in QUOTA_CODES):
                        if status == 429:  # up, but busy: the limiter's business, not the breaker's
                            self.breaker.succeeded()
                        else:
                            self.breaker.failed(last_error)
                        delay = _retry_after(response)
                        # A provider's Retry-After is obeyed up to vision.retry_after_cap_seconds:
                        # a wrong header (an hour, a date) must not park the worker.
                        delay = (
                            self._backoff(attempt)
                            if delay is None
                            else min(delay, self.settings.retry_after_cap_seconds)
                        )
                    else:
                        self.breaker.succeeded()  # the provider answered; the request is the problem
                        raise self._tag(
                            VisionPermanent(
                                f"{self.preset.name} refused the request for study {study}: {last_error}"
                                + (" (check vision.api_key)" if status in (401, 403) else "")
                            ),
                            calls,
                        )
            except httpx.RequestError as exc:  # timeouts, refused connections, undecodable bodies
                last_error = f"{type(exc).__name__}"
                if isinstance(exc, NEVER_LEFT) and disclosed is not None:
                    self._not_sent(disclosed, last_error)
                    disclosed = None  # the api_calls row records no disclosure either
                self._record(
                    calls,
                    study,
                    images,
                    0,
                    0,
                    (time.perf_counter() - started) * 1000,
                    None,
                    last_error,
                    disclosed,
                )
                self.breaker.failed(last_error)
                delay = self._backoff(attempt)
            except (VisionPermanent, VisionRetryable):  # the breaker was told, or nothing was sent
                raise
            except Exception as exc:
                # Anything unforeseen still ends this call for the breaker: a half-open trial
                # left running would keep the circuit open (every study postponed) until restart.
                self.breaker.failed(type(exc).__name__)
                raise
            if attempt < self.settings.max_retries and delay is not None:
                log.warning(
                    "study %s: %s; retry %d of %d in %.2f s",
                    study,
                    last_error,
                    attempt + 1,
                    self.settings.max_retries,
                    delay,
                )
                self.sleep(delay)
        raise self._tag(
            VisionRetryable(
                f"{self.preset.name}: no usable reply for study {study} after "
                f"{self.settings.max_retries + 1} attempts; last: {last_error}"
            ),
            calls,
        )

    def _record(
        self,
        calls: list[CallRecord],
        study: str,
        images: list[EncodedImage],
        prompt_tokens: int,
        completion_tokens: int,
        latency: float,
        status: int | None,
        error: str | None,
        disclosed: Disclosure | None = None,
    ) -> None:
        record = CallRecord(
            study,
            self.preset.name,
            self.model,
            len(images),
            prompt_tokens,
            completion_tokens,
            self.cost(prompt_tokens, completion_tokens),
            round(latency, 1),
            status,
            error,
        )
        if disclosed is not None:
            record = dataclasses.replace(
                record,
                endpoint_host=disclosed.endpoint_host,
                image_sha256=" ".join(disclosed.image_sha256),
                prompt_sha256=disclosed.prompt_sha256,
                request_sha256=disclosed.request_sha256,
                request_bytes=disclosed.request_bytes,
                sent_at=disclosed.sent_at,
            )
        calls.append(record)

    def _not_sent(self, disclosed: Disclosure, error: str) -> None:
        """Follow the audit record of a request that never left with a line saying so. If that
        line cannot be written the record stands: the log over-states, never under-states."""
        if self.disclosures is None:
            return
        try:
            self.disclosures.append_not_sent(
                disclosed, f"{error}: the connection failed before any byte of the request was sent"
            )
        except DisclosureNotRecorded as exc:
            log.warning(
                "study %s: a request was not sent, but the audit log cannot say so: %s",
                disclosed.study_instance_uid,
                exc.__cause__ or exc,
            )

    def _disclose(
        self, study: str, images: list[EncodedImage], prompt: str, url: str, payload: bytes
    ) -> Disclosure:
        """The record of what this request discloses, written to the audit log (when there is
        one) before the request leaves: no record, no request."""
        disclosed = Disclosure.of(
            study,
            self.preset.name,
            httpx.URL(url).host,
            self.model,
            [image.data for image in images],
            prompt,
            payload,
        )
        if self.disclosures is not None:
            try:
                self.disclosures.append(disclosed)
            except DisclosureNotRecorded as exc:
                raise VisionRetryable(str(exc)) from exc
        return disclosed
