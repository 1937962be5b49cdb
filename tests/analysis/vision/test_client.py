"""The real client against ``ainode simulate-vision`` over HTTP: no patched functions."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from analysis.encode import EncodedImage
from analysis.errors import (
    BudgetExceeded,
    CircuitOpen,
    InvalidFindings,
    ModelRefused,
    VisionPermanent,
    VisionRetryable,
)
from analysis.finding_codes import BodyRegion, code_list
from analysis.vision.client import VisionClient
from conf import VisionSettings
from tests.data.images import noise_image
from tests.nodes import simulator

API_KEY = "sk-test-9f8e7d6c5b4a-secret"


def one_image() -> list[EncodedImage]:
    return [noise_image(512)]


OPEN_CLIENTS: list[VisionClient] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while OPEN_CLIENTS:
        OPEN_CLIENTS.pop().close()


def client(base_url: str, sleeps: list[float] | None = None, **overrides: Any) -> VisionClient:
    values: dict[str, Any] = {
        "provider": "simulator",
        "base_url": base_url,
        "api_key": SecretStr(API_KEY),
        "timeout_seconds": 5,
        "max_retries": 5,
        "backoff_base_seconds": 0.01,
        "backoff_cap_seconds": 0.05,
        "requests_per_minute": 0,
        **overrides,
    }

    def sleep(seconds: float) -> None:
        if sleeps is not None:
            sleeps.append(seconds)
        time.sleep(seconds)

    vision = VisionClient(VisionSettings(**values), sleep=sleep)
    OPEN_CLIENTS.append(vision)
    return vision


def test_findings_come_back_validated_and_every_call_is_recorded(tmp_path: Path) -> None:
    with simulator(tmp_path) as url:
        result = client(url).analyse("1.2.3", one_image(), "Describe the findings.")
    assert result.findings.summary.startswith("SIMULATED")
    (finding,) = result.findings.findings
    assert finding.box is not None and (finding.box.x_min, finding.box.y_max) == (0.30, 0.42)
    (call,) = result.calls
    assert (call.status, call.error, call.images, call.provider) == (200, None, 1, "simulator")
    assert call.prompt_tokens > 0 and call.completion_tokens > 0 and call.latency_ms > 0


def test_429_with_retry_after_then_500_are_retried_until_success(tmp_path: Path) -> None:
    sleeps: list[float] = []
    with simulator(tmp_path, "--fail-429", "3", "--retry-after", "0.2", "--fail-500", "2") as url:
        started = time.monotonic()
        result = client(url, sleeps).analyse("1.2.3", one_image(), "Describe.")
        elapsed = time.monotonic() - started
    assert [c.status for c in result.calls] == [429, 429, 429, 500, 500, 200]
    assert sleeps[:3] == [0.2, 0.2, 0.2]  # Retry-After honoured
    assert all(0 <= s <= 0.05 for s in sleeps[3:])  # jittered backoff, capped
    assert elapsed >= 0.6


def test_malformed_reply_gets_one_repair_request_quoting_the_error(tmp_path: Path) -> None:
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--malformed", "1", "--record", str(record)) as url:
        result = client(url).analyse("1.2.3", one_image(), "Describe.")
    assert len(result.calls) == 2 and result.findings.findings
    repair = json.loads(record.read_text().splitlines()[1])
    correction = repair["messages"][-1]["content"]
    assert correction == (
        "Your reply could not be used: the reply is a JSON object cut off before its end (truncated?). "
        "Reply again with only one JSON object that follows the required schema."
    )
    assert repair["messages"][-2] == {
        "role": "assistant",
        "content": '{"study_quality": "SIMULATED malformed", "findings": "not a list"',
    }


def test_still_invalid_after_repair_fails_with_the_raw_reply_kept(tmp_path: Path) -> None:
    with simulator(tmp_path, "--malformed", "2") as url, pytest.raises(InvalidFindings) as caught:
        client(url).analyse("1.2.3", one_image(), "Describe.")
    assert caught.value.raw_reply.startswith('{"study_quality": "SIMULATED malformed"')
    assert len(caught.value.calls) == 2  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        (["--fail-status", "401", "--fail-status-count", "9"], "HTTP 401.*check vision.api_key"),
        (["--fail-status", "400", "--fail-status-count", "9"], "HTTP 400"),
        (["--quota-exhausted"], "HTTP 429 insufficient_quota"),
    ],
)
def test_client_errors_and_quota_fail_fast_without_retry(
    tmp_path: Path, flags: list[str], match: str
) -> None:
    with simulator(tmp_path, *flags) as url, pytest.raises(VisionPermanent, match=match) as caught:
        client(url).analyse("1.2.3", one_image(), "Describe.")
    assert len(caught.value.calls) == 1  # type: ignore[attr-defined]


def test_timeouts_are_retried_then_reported_as_retryable(tmp_path: Path) -> None:
    with (
        simulator(tmp_path, "--latency-ms", "1500") as url,
        pytest.raises(VisionRetryable, match="ReadTimeout"),
    ):
        client(url, timeout_seconds=0.3, max_retries=2).analyse("1.2.3", one_image(), "Describe.")


def test_circuit_opens_after_repeated_failures_and_stops_calling(tmp_path: Path) -> None:
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--fail-500", "100", "--record", str(record)) as url:
        vision = client(url, max_retries=1, circuit_failure_threshold=3, circuit_cooldown_seconds=60)
        with pytest.raises(VisionRetryable):
            vision.analyse("1.1", one_image(), "Describe.")  # 2 failures
        with pytest.raises(CircuitOpen, match="circuit open after 3 failures"):
            vision.analyse("1.2", one_image(), "Describe.")  # 1 more failure opens it
        with pytest.raises(CircuitOpen):
            vision.analyse("1.3", one_image(), "Describe.")  # no call at all
    assert len(record.read_text().splitlines()) == 3


def test_a_study_over_budget_is_refused_before_any_call(tmp_path: Path) -> None:
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--record", str(record)) as url:
        vision = client(url, provider="simulator")
        vision.preset = type(vision.preset)(
            **{**vision.preset.__dict__, "price_input_per_mtok": 3.0, "price_output_per_mtok": 15.0}
        )
        vision.settings = vision.settings.model_copy(update={"max_cost_usd_per_study": 0.01})
        with pytest.raises(BudgetExceeded, match=r"over vision.max_cost_usd_per_study \$0.01"):
            vision.analyse("1.2.3", one_image() * 4, "Describe.")
    assert not record.exists()


def test_the_api_key_is_sent_but_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--fail-500", "1", "--record", str(record)) as url:
        client(url).analyse("1.2.3", one_image(), "Describe.")
    assert API_KEY not in caplog.text and API_KEY not in record.read_text()
    assert "retry 1 of 5" in caplog.text


def test_a_text_only_provider_is_refused_at_start() -> None:
    with pytest.raises(ValueError, match='"deepseek" \\(model deepseek-chat\\) takes text only'):
        VisionSettings(provider="deepseek")


@pytest.mark.parametrize("provider", ["holysheep", "openai", "gemini", "anthropic", "ollama"])
@pytest.mark.parametrize("style", ["fenced", "prose"])
def test_json_in_fences_or_after_prose_is_read_in_every_wire_mode(
    tmp_path: Path, provider: str, style: str
) -> None:
    with simulator(tmp_path, "--style", style) as url:
        result = client(url, provider=provider).analyse("1.2.3", one_image(), "Describe.")
    (finding,) = result.findings.findings
    assert finding.description.startswith("SIMULATED") and finding.box is not None
    assert len(result.calls) == 1  # found as written: no repair request


def test_a_reply_cut_at_max_tokens_is_asked_again_with_twice_the_limit(tmp_path: Path) -> None:
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--reply-tokens", "3000", "--record", str(record)) as url:
        result = client(url, max_output_tokens=2048).analyse("1.2.3", one_image(), "Describe.")
    assert result.findings.summary.startswith("SIMULATED")
    sent = [json.loads(line) for line in record.read_text().splitlines()]
    assert [body["max_tokens"] for body in sent] == [2048, 4096]
    assert len(sent[1]["messages"]) == 2  # the same question again, not a repair


def test_a_reply_cut_twice_fails_with_a_reason_naming_the_setting(tmp_path: Path) -> None:
    with (
        simulator(tmp_path, "--reply-tokens", "9000") as url,
        pytest.raises(InvalidFindings, match=r"cut at max_tokens 4096 twice; raise vision\.max_output"),
    ):
        client(url, max_output_tokens=2048).analyse("1.2.3", one_image(), "Describe.")


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_refusal_is_final_and_keeps_the_models_reason(tmp_path: Path, provider: str) -> None:
    with simulator(tmp_path, "--refuse", "5") as url, pytest.raises(ModelRefused) as caught:
        client(url, provider=provider).analyse("1.2.3", one_image(), "Describe.")
    assert "the model declined to answer: SIMULATED refusal: I can't help" in str(caught.value)
    assert len(caught.value.calls) == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("provider", ["holysheep", "openai", "gemini", "anthropic", "ollama"])
def test_answers_at_the_schemas_edges_never_fail_the_study(tmp_path: Path, provider: str) -> None:
    """Highest image index, a box of no area, certainty 1, urgency 5: all allowed by the schema
    we sent, so all must read; the box is dropped with a note."""
    with simulator(tmp_path, "--boundary", "--findings", "3") as url:
        result = client(url, provider=provider).analyse("1.2.3", one_image() * 2, "Describe.")
    assert len(result.findings.findings) == 3 and result.findings.overall_urgency == 5
    for finding in result.findings.findings:
        assert (finding.image_index, finding.box, finding.confidence) == (2, None, 1.0)
        assert finding.notes == ("The model's region is not shown: it has no area inside the image.",)
    assert len(result.calls) == 1


def test_the_simulator_answers_a_schemaless_json_request_in_a_shape_of_its_own(tmp_path: Path) -> None:
    """A json_object request that never shows the schema (the old bug) gets what a real model
    gives: JSON of its own shape, which the repair request cannot fix either."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Describe the findings as JSON."}],
        "response_format": {"type": "json_object"},
    }
    with simulator(tmp_path) as url, httpx.Client() as http:
        answer = http.post(f"{url}/chat/completions", json=body).json()
        no_json_word = http.post(
            f"{url}/chat/completions",
            json={**body, "messages": [{"role": "user", "content": "Describe the findings."}]},
        )
    content = json.loads(answer["choices"][0]["message"]["content"])
    assert "summary" not in content and "impression" in content
    assert no_json_word.status_code == 400 and "must contain the word 'json'" in no_json_word.text


def test_a_strict_schema_outside_openais_subset_is_refused_as_openai_does(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"summary": {"type": "string", "minLength": 1}},
        "required": ["summary"],
        "additionalProperties": False,
    }
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "Describe."}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "f", "strict": True, "schema": schema},
        },
    }
    with simulator(tmp_path) as url, httpx.Client() as http:
        response = http.post(f"{url}/chat/completions", json=body)
    assert response.status_code == 400 and "'minLength' is not permitted" in response.text


def test_anthropic_requests_need_a_key_and_a_version_like_the_real_api(tmp_path: Path) -> None:
    body = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}
    with simulator(tmp_path) as url, httpx.Client() as http:
        no_key = http.post(f"{url}/messages", json=body, headers={"anthropic-version": "2023-06-01"})
        no_version = http.post(f"{url}/messages", json=body, headers={"x-api-key": "k"})
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"
    assert no_version.status_code == 400 and "anthropic-version" in no_version.text


def test_what_a_study_spent_already_counts_against_its_budget(tmp_path: Path) -> None:
    record = tmp_path / "requests.jsonl"
    with simulator(tmp_path, "--record", str(record)) as url:
        vision = client(url, provider="simulator", max_cost_usd_per_study=0.10)  # worst case 0.09
        vision.preset = type(vision.preset)(
            **{**vision.preset.__dict__, "price_input_per_mtok": 2.0, "price_output_per_mtok": 8.0}
        )
        vision.analyse("1.2.3", one_image(), "Describe.", spent_usd=0.0)  # fits alone
        with pytest.raises(BudgetExceeded, match=r"\$0\.0400 spent already"):
            vision.analyse("1.2.3", one_image(), "Describe.", spent_usd=0.04)
    assert len(record.read_text().splitlines()) == 1


def test_retry_after_is_obeyed_only_up_to_its_cap(tmp_path: Path) -> None:
    sleeps: list[float] = []
    with simulator(tmp_path, "--fail-429", "1", "--retry-after", "3600") as url:
        client(url, sleeps, retry_after_cap_seconds=0.1).analyse("1.2.3", one_image(), "Describe.")
    assert sleeps == [0.1]


def test_a_reply_past_the_size_limit_is_not_read_whole(tmp_path: Path) -> None:
    with (
        simulator(tmp_path, "--reply-tokens", "20000") as url,
        pytest.raises(VisionRetryable, match="ReplyTooLarge"),
    ):
        client(url, max_reply_bytes=16_384, max_output_tokens=40_000, max_retries=1).analyse(
            "1.2.3", one_image(), "Describe."
        )


def test_a_reply_that_drips_in_is_cut_at_the_request_deadline(tmp_path: Path) -> None:
    """Each 64-byte piece comes well within the read timeout; the whole never within the
    deadline, so the study's lease is not held for ever."""
    with (
        simulator(tmp_path, "--drip-ms", "50") as url,
        pytest.raises(VisionRetryable, match="ReadTimeout"),
    ):
        client(url, timeout_seconds=5, request_deadline_seconds=0.5, max_retries=0).analyse(
            "1.2.3", one_image(), "Describe."
        )


def test_a_reply_too_deeply_nested_to_parse_during_the_half_open_trial_does_not_jam_the_circuit() -> None:
    """A 200 whose JSON nests deeper than Python's recursion limit (RecursionError, not
    ValueError) is an unreadable reply like any other: the half-open trial it ended is over, so
    the circuit can try again after its cooldown instead of staying open until a restart."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    answers = [(500, b'{"error": {"message": "down"}}'), (200, b"[" * 200_000)]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            status, body = answers.pop(0) if answers else (500, b"{}")
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        vision = client(url, max_retries=0, circuit_failure_threshold=1, circuit_cooldown_seconds=0.2)
        with pytest.raises(VisionRetryable):
            vision.analyse("1.1", one_image(), "Describe.")  # the 500 opens the circuit
        time.sleep(0.3)
        with pytest.raises(VisionRetryable, match="unreadable body"):
            vision.analyse("1.2", one_image(), "Describe.")  # the half-open trial
        time.sleep(0.3)
        assert vision.breaker.state == "half-open"
        assert vision.breaker.allow(), "the circuit is jammed open: no trial call is ever let through"
    finally:
        server.shutdown()
        server.server_close()


def test_a_disclosure_that_cannot_be_recorded_during_the_half_open_trial_does_not_jam_the_circuit(
    tmp_path: Path,
) -> None:
    """The half-open trial is let through, then the audit line cannot be written (a full disk):
    nothing is sent, which says nothing of the provider, and the trial is over, so once there is
    room again the circuit tries the provider instead of staying open until a restart."""
    from storage.disclosures import DisclosureLog

    blocked = tmp_path / "root"
    blocked.mkdir()
    (blocked / "audit").write_text("a file where the audit folder should be")
    vision = client(
        "http://127.0.0.1:9/v1", max_retries=0, circuit_failure_threshold=1, circuit_cooldown_seconds=0.1
    )
    vision.disclosures = DisclosureLog(blocked)
    vision.breaker.failed("HTTP 500")  # the provider was failing: the circuit opens
    time.sleep(0.15)
    assert vision.breaker.state == "half-open"
    with pytest.raises(VisionRetryable, match="cannot record the disclosure"):
        vision.analyse("1.2", one_image(), "Describe.")  # the trial, never sent
    assert vision.breaker.allow(), "the circuit is jammed open: no trial call is ever let through"


@pytest.mark.parametrize("provider", ["holysheep", "openai", "anthropic", "ollama"])
def test_every_wire_mode_offers_the_studys_code_list_and_keeps_a_code_from_it(
    tmp_path: Path, provider: str
) -> None:
    """The closed list of the study's body region reaches the model in every structured mode
    (json_schema, a tool, the schema in the system message): the simulator answers the first code
    of the enum the request shows, and the client keeps it."""
    with simulator(tmp_path) as url:
        vision = client(url, provider=provider)
        for region, first in ((BodyRegion.HEAD, "301766008"), (BodyRegion.BREAST, "399294002")):
            result = vision.analyse("1.2.3", one_image(), "Describe.", codes=code_list([region]))
            assert [f.finding_code for f in result.findings.findings] == [first]


def test_a_request_whose_connection_was_refused_is_followed_in_the_audit_log(tmp_path: Path) -> None:
    """The record is written before the request leaves; when the connection is then refused, a
    follow-up line names it as not sent and the call records no disclosure. A request that did
    leave (answered 500 here) gets no such line."""
    from storage.disclosures import DisclosureLog
    from tests.nodes import free_port

    audit = DisclosureLog(tmp_path / "root")
    refused = client(f"http://127.0.0.1:{free_port()}/v1", max_retries=1)  # nothing listens there
    refused.disclosures = audit
    with pytest.raises(VisionRetryable) as raised:
        refused.analyse("1.2.7", one_image(), "Describe.")
    lines = [json.loads(line) for line in audit.path.read_text().splitlines()]
    records, follow_ups = lines[0::2], lines[1::2]
    assert len(records) == len(follow_ups) == 2
    for record, follow_up in zip(records, follow_ups, strict=True):
        assert "not_sent" not in record and record["study_instance_uid"] == "1.2.7"
        assert follow_up["not_sent"] is True
        assert (follow_up["request_sha256"], follow_up["sent_at"]) == (
            record["request_sha256"],
            record["sent_at"],
        )
        assert follow_up["reason"].startswith("ConnectError: the connection failed before any byte")
    calls = raised.value.calls  # type: ignore[attr-defined]
    assert [(c.error, c.request_sha256, c.sent_at) for c in calls] == [("ConnectError", None, None)] * 2

    with simulator(tmp_path, "--fail-500", "1") as url:
        answered = client(url, max_retries=0)
        answered.disclosures = audit
        with pytest.raises(VisionRetryable) as failed:
            answered.analyse("1.2.8", one_image(), "Describe.")
    (last,) = [json.loads(line) for line in audit.path.read_text().splitlines()[4:]]
    assert last["study_instance_uid"] == "1.2.8" and "not_sent" not in last
    (call,) = failed.value.calls  # type: ignore[attr-defined]
    assert (call.status, call.request_sha256) == (500, last["request_sha256"])
