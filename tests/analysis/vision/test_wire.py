"""Request and reply shapes, checked against the providers' documented formats."""

from __future__ import annotations

import base64
import json

import pytest

from analysis.encode import EncodedImage
from analysis.findings import FINDINGS_SCHEMA
from analysis.vision import wire
from conf.providers import PRESETS

IMAGE = EncodedImage(b"\xff\xd8\xff\xe0fake-jpeg", "image/jpeg", 1024, 768)
B64 = base64.b64encode(IMAGE.data).decode()


def test_openai_chat_completions_body_is_the_documented_shape_byte_for_byte() -> None:
    body = wire.build_body(PRESETS["openai"], "gpt-4.1", [IMAGE], "Describe.", 2048, 0.0)
    documented = {  # platform.openai.com/docs/api-reference/chat/create, vision + structured outputs
        "model": "gpt-4.1",
        "messages": [
            {"role": "system", "content": wire.SYSTEM_PROMPT},
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": f"data:image/jpeg;base64,{B64}", "detail": "high"},
                    },
                    {"type": "text", "text": "Describe."},
                ],
            },
        ],
        "max_tokens": 2048,
        "temperature": 0.0,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "findings", "strict": True, "schema": FINDINGS_SCHEMA},
        },
    }
    assert json.dumps(body) == json.dumps(documented)
    assert (
        wire.endpoint(PRESETS["openai"], "https://api.openai.com/v1/")
        == "https://api.openai.com/v1/chat/completions"
    )
    assert wire.headers(PRESETS["openai"], "sk-1") == {
        "content-type": "application/json",
        "authorization": "Bearer sk-1",
    }


def test_json_object_mode_for_providers_without_strict_schemas() -> None:
    body = wire.build_body(PRESETS["holysheep"], "vision-pro", [IMAGE], "Describe.", 100, 0.2)
    assert body["response_format"] == {"type": "json_object"}
    assert body["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")


def test_anthropic_messages_body_is_the_documented_shape_byte_for_byte() -> None:
    body = wire.build_body(PRESETS["anthropic"], "claude-sonnet-4-5", [IMAGE], "Describe.", 2048, 0.0)
    documented = {  # docs.anthropic.com/en/api/messages: images before text, forced tool use
        "model": "claude-sonnet-4-5",
        "max_tokens": 2048,
        "temperature": 0.0,
        "system": wire.SYSTEM_PROMPT,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": B64}},
                    {"type": "text", "text": "Describe."},
                ],
            }
        ],
        "tools": [
            {
                "name": "report_findings",
                "description": "Report the findings of the study.",
                "input_schema": FINDINGS_SCHEMA,
            }
        ],
        "tool_choice": {"type": "tool", "name": "report_findings"},
    }
    assert json.dumps(body) == json.dumps(documented)
    assert (
        wire.endpoint(PRESETS["anthropic"], "https://api.anthropic.com/v1")
        == "https://api.anthropic.com/v1/messages"
    )
    assert wire.headers(PRESETS["anthropic"], "sk-ant") == {
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "x-api-key": "sk-ant",
    }


def test_repair_history_follows_the_original_question() -> None:
    openai = wire.build_body(PRESETS["openai"], "m", [IMAGE], "Q", 10, 0.0, [("bad", "fix it")])
    assert openai["messages"][2:] == [
        {"role": "assistant", "content": "bad"},
        {"role": "user", "content": "fix it"},
    ]
    anthropic = wire.build_body(PRESETS["anthropic"], "m", [IMAGE], "Q", 10, 0.0, [("bad", "fix it")])
    assert [m["role"] for m in anthropic["messages"]] == ["user", "assistant", "user"]


def test_documented_replies_parse() -> None:
    openai_reply = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": '{"a": 1}'}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1200, "completion_tokens": 80, "total_tokens": 1280},
    }
    assert wire.parse_reply(PRESETS["openai"], openai_reply) == wire.Reply('{"a": 1}', 1200, 80)
    anthropic_reply = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "report_findings", "input": {"a": 1}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 1500, "output_tokens": 90},
    }
    assert wire.parse_reply(PRESETS["anthropic"], anthropic_reply) == wire.Reply('{"a": 1}', 1500, 90)
    with pytest.raises(wire.ReplyFormatError, match="not a openai response"):
        wire.parse_reply(PRESETS["openai"], {"unexpected": True})
