"""The two wire formats, hand-written: OpenAI chat completions and Anthropic Messages.

OpenAI: https://platform.openai.com/docs/api-reference/chat/create (images as ``image_url`` data
URLs; ``response_format`` ``json_schema`` with ``strict``, or ``json_object``). Used as is by
Gemini's OpenAI-compatible endpoint, vLLM, Ollama and the seed document's provider.
Anthropic: https://docs.anthropic.com/en/api/messages (``x-api-key``, ``anthropic-version``,
base64 ``image`` blocks before the text, the answer forced through one tool's ``input_schema``).
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from analysis.encode import EncodedImage
from analysis.finding_codes import GENERAL_CODES, CodeList
from analysis.findings import box_sentence, findings_schema
from conf.providers import ProviderPreset

ANTHROPIC_VERSION = "2023-06-01"
TOOL_NAME = "report_findings"
ROLE = "You are a careful radiology assistant pre-reading a study for a radiologist."


@dataclass(frozen=True)
class Reply:
    """What came back: the findings JSON as text, the token usage, and whether the model stopped
    because it ran out of tokens (``truncated``) or declined (``refusal``, its own words)."""

    content: str
    prompt_tokens: int
    completion_tokens: int
    truncated: bool = False
    refusal: str | None = None


class ReplyFormatError(ValueError):
    """The HTTP body is not a reply of the expected wire format."""


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def _count(value: Any) -> int:
    """A token count from ``usage``; 0 for what is not one (null, a string, 1e400), which must
    not throw away a reply whose findings are fine."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    try:
        number = float(value)
    except OverflowError:
        return 0
    return int(number) if math.isfinite(number) and number >= 0 else 0


def _said(text: str) -> str:
    """The model's own words for the error message and the database (PostgreSQL refuses NUL)."""
    return _CONTROL.sub(" ", text)


def system_message(preset: ProviderPreset, schema: dict[str, Any]) -> str:
    """The system text for ``preset``'s structured mode: the box convention, stated once, and in
    ``json_object`` mode the schema itself, since nothing else shows it to the model."""
    lines = [ROLE, box_sentence(preset.box_convention)]
    if preset.structured == "json_object":
        lines += [
            "Answer with one JSON object, and nothing else, that validates against this JSON Schema:",
            json.dumps(schema, separators=(",", ":")),
        ]
    elif preset.structured == "tool":
        lines.append(f"Report through the {TOOL_NAME} tool.")
    else:
        lines.append("Answer only with the requested JSON object.")
    return "\n".join(lines)


def headers(preset: ProviderPreset, api_key: str | None) -> dict[str, str]:
    result = {"content-type": "application/json"}
    if preset.wire == "anthropic":
        result["anthropic-version"] = ANTHROPIC_VERSION
        if api_key:
            result["x-api-key"] = api_key
    elif api_key:
        result["authorization"] = f"Bearer {api_key}"
    return result


def endpoint(preset: ProviderPreset, base_url: str) -> str:
    path = "/messages" if preset.wire == "anthropic" else "/chat/completions"
    return base_url.rstrip("/") + path


def request_schema(
    preset: ProviderPreset, images: Sequence[EncodedImage], codes: CodeList = GENERAL_CODES
) -> dict[str, Any]:
    return findings_schema([(image.width, image.height) for image in images], preset.box_convention, codes)


def _data_url(image: EncodedImage) -> str:
    return f"data:{image.media_type};base64,{base64.b64encode(image.data).decode('ascii')}"


def build_body(
    preset: ProviderPreset,
    model: str,
    images: list[EncodedImage],
    prompt: str,
    max_tokens: int,
    temperature: float,
    history: Sequence[tuple[str, str]] = (),
    codes: CodeList = GENERAL_CODES,
) -> dict[str, Any]:
    """The request body; ``history`` holds (bad reply, correction) pairs for a repair request.
    The schema is built for these images and the closed list of codes of the study's body region
    (:func:`analysis.findings.findings_schema`)."""
    schema = request_schema(preset, images, codes)
    system = system_message(preset, schema)
    if preset.wire == "anthropic":
        content: list[dict[str, Any]] = [
            {
                "type": "image",
                "source": {
                    "type": "base64",
                    "media_type": image.media_type,
                    "data": base64.b64encode(image.data).decode("ascii"),
                },
            }
            for image in images
        ]
        content.append({"type": "text", "text": prompt})
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        for bad, correction in history:
            messages += [
                {"role": "assistant", "content": [{"type": "text", "text": bad}]},
                {"role": "user", "content": [{"type": "text", "text": correction}]},
            ]
        return {
            "model": model,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "system": system,
            "messages": messages,
            "tools": [
                {
                    "name": TOOL_NAME,
                    "description": "Report the findings of the study.",
                    "input_schema": schema,
                }
            ],
            "tool_choice": {"type": "tool", "name": TOOL_NAME},
        }
    user: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": _data_url(image), "detail": "high"}} for image in images
    ]
    user.append({"type": "text", "text": prompt})
    chat: list[dict[str, Any]] = [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
    ]
    for bad, correction in history:
        chat += [{"role": "assistant", "content": bad}, {"role": "user", "content": correction}]
    body: dict[str, Any] = {
        "model": model,
        "messages": chat,
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    if preset.structured == "json_schema":
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "findings", "strict": True, "schema": schema},
        }
    else:
        body["response_format"] = {"type": "json_object"}
    return body


def shown_body(body: dict[str, Any], image_files: Sequence[str]) -> dict[str, Any]:
    """``body`` as ``ainode preview`` writes it: every image's base64 replaced by the name of the
    file that holds its bytes, in order; everything else exactly as sent."""
    names = iter(image_files)

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            if value.get("type") == "image_url":
                return {**value, "image_url": {**value["image_url"], "url": f"(the bytes of {next(names)})"}}
            if value.get("type") == "base64" and "data" in value:
                return {**value, "data": f"(the bytes of {next(names)})"}
            return {key: walk(item) for key, item in value.items()}
        if isinstance(value, list):
            return [walk(item) for item in value]
        return value

    result: dict[str, Any] = walk(body)
    return result


def parse_reply(preset: ProviderPreset, payload: Any) -> Reply:
    """Extract the findings text, usage and stop reason; :class:`ReplyFormatError` when the body
    is not a reply of this wire format at all."""
    try:
        if preset.wire == "anthropic":
            usage = payload.get("usage") or {}
            stop = payload.get("stop_reason")
            blocks = payload["content"]
            texts = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
            for block in blocks:
                if block.get("type") == "tool_use" and block.get("name") == TOOL_NAME:
                    text = json.dumps(block["input"])
                    break
            else:
                text = texts
            return Reply(
                text,
                _count(usage.get("input_tokens")),
                _count(usage.get("output_tokens")),
                truncated=stop == "max_tokens",
                refusal=_said(texts or "no reason given") if stop == "refusal" else None,
            )
        usage = payload.get("usage") or {}
        choice = payload["choices"][0]
        message = choice["message"]
        text = message.get("content") or ""
        if isinstance(text, list):  # some servers answer with content parts
            text = "".join(part.get("text", "") for part in text if isinstance(part, dict))
        finish = choice.get("finish_reason")
        refusal = message.get("refusal") or (
            "the provider's content filter stopped the reply" if finish == "content_filter" else None
        )
        return Reply(
            str(text),
            _count(usage.get("prompt_tokens")),
            _count(usage.get("completion_tokens")),
            truncated=finish == "length",
            refusal=_said(str(refusal)) if refusal else None,
        )
    except (KeyError, IndexError, TypeError, AttributeError, ValueError) as exc:
        raise ReplyFormatError(f"reply is not a {preset.wire} response: {type(exc).__name__} {exc}") from None
