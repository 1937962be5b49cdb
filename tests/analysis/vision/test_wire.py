"""Request and reply shapes, checked against the providers' documented formats."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from analysis.encode import EncodedImage
from analysis.findings import box_sentence, findings_schema
from analysis.vision import wire
from conf.providers import PRESETS

IMAGE = EncodedImage(b"\xff\xd8\xff\xe0fake-jpeg", "image/jpeg", 1024, 768)
B64 = base64.b64encode(IMAGE.data).decode()
SCHEMA = findings_schema([(1024, 768)], "fraction")


def test_openai_chat_completions_body_is_the_documented_shape_byte_for_byte() -> None:
    body = wire.build_body(PRESETS["openai"], "gpt-4.1", [IMAGE], "Describe.", 2048, 0.0)
    documented = {  # platform.openai.com/docs/api-reference/chat/create, vision + structured outputs
        "model": "gpt-4.1",
        "messages": [
            {"role": "system", "content": wire.system_message(PRESETS["openai"], SCHEMA)},
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
            "json_schema": {"name": "findings", "strict": True, "schema": SCHEMA},
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


@pytest.mark.parametrize("provider", ["holysheep", "ollama"])
def test_json_object_mode_writes_the_schema_into_the_system_message(provider: str) -> None:
    """json_object servers never see a schema unless we write it out: the bug that failed every
    study with the default provider."""
    body = wire.build_body(PRESETS[provider], "m", [IMAGE, IMAGE], "Describe.", 100, 0.2)
    assert body["response_format"] == {"type": "json_object"}
    system = body["messages"][0]["content"]
    assert "JSON" in system  # OpenAI refuses json_object requests whose messages never say JSON
    written = json.loads(system.split("\n")[-1])
    assert written == findings_schema([(1024, 768)] * 2, "fraction")
    assert "Answer with one JSON object, and nothing else, that validates against this JSON Schema:" in system
    assert body["messages"][1]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")


@pytest.mark.parametrize("provider", ["holysheep", "openai", "gemini", "anthropic", "ollama", "vllm"])
def test_one_box_convention_stated_once_and_matching_the_schema(provider: str) -> None:
    preset = PRESETS[provider]
    body = wire.build_body(preset, "m", [IMAGE], "Describe.", 100, 0.0)
    system = body["system"] if preset.wire == "anthropic" else body["messages"][0]["content"]
    sentence = box_sentence(preset.box_convention)
    prose = system.split("\n")[:-1] if preset.structured == "json_object" else system.split("\n")
    assert "\n".join(prose).count(sentence) == 1  # (json_object: the written schema repeats it)
    schema = (
        body["tools"][0]["input_schema"]
        if preset.structured == "tool"
        else body["response_format"]["json_schema"]["schema"]
        if preset.structured == "json_schema"
        else json.loads(system.split("\n")[-1])
    )
    box = schema["properties"]["findings"]["items"]["properties"]["box"]["anyOf"][0]
    assert box["description"].endswith(sentence)
    assert "pixel" not in json.dumps(body).replace(sentence, "") or preset.box_convention == "pixel"


def test_anthropic_messages_body_is_the_documented_shape_byte_for_byte() -> None:
    pixel_schema = findings_schema([(1024, 768)], "pixel")
    body = wire.build_body(PRESETS["anthropic"], "claude-sonnet-4-5", [IMAGE], "Describe.", 2048, 0.0)
    documented = {  # docs.anthropic.com/en/api/messages: images before text, forced tool use
        "model": "claude-sonnet-4-5",
        "max_tokens": 2048,
        "temperature": 0.0,
        "system": wire.system_message(PRESETS["anthropic"], pixel_schema),
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
                "input_schema": pixel_schema,
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
    cut = json.loads(json.dumps(openai_reply).replace('"finish_reason": "stop"', '"finish_reason": "length"'))
    assert wire.parse_reply(PRESETS["openai"], cut).truncated
    refused = {
        "choices": [
            {
                "message": {"role": "assistant", "content": None, "refusal": "I can't."},
                "finish_reason": "stop",
            }
        ]
    }
    assert wire.parse_reply(PRESETS["openai"], refused).refusal == "I can't."
    anthropic_reply = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_1", "name": "report_findings", "input": {"a": 1}}],
        "stop_reason": "tool_use",
        "usage": {"input_tokens": 1500, "output_tokens": 90},
    }
    assert wire.parse_reply(PRESETS["anthropic"], anthropic_reply) == wire.Reply('{"a": 1}', 1500, 90)
    assert wire.parse_reply(PRESETS["anthropic"], {**anthropic_reply, "stop_reason": "max_tokens"}).truncated
    declined = {**anthropic_reply, "stop_reason": "refusal", "content": [{"type": "text", "text": "No."}]}
    assert wire.parse_reply(PRESETS["anthropic"], declined).refusal == "No."
    with pytest.raises(wire.ReplyFormatError, match="not a openai response"):
        wire.parse_reply(PRESETS["openai"], {"unexpected": True})


@pytest.mark.parametrize("count", [None, "12", 1e400, -3, True, 10**400])
def test_usage_that_is_not_a_count_costs_nothing_and_keeps_the_reply(count: Any) -> None:
    """A server's odd ``usage`` (null, a string, 1e400 that JSON reads as infinity) must not
    discard findings: the count is 0, never an OverflowError or a retried 'unreadable body'."""
    openai_reply = {
        "choices": [{"message": {"role": "assistant", "content": '{"a": 1}'}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": count, "completion_tokens": count},
    }
    assert wire.parse_reply(PRESETS["openai"], openai_reply) == wire.Reply('{"a": 1}', 0, 0)
    anthropic_reply = {
        "content": [{"type": "text", "text": '{"a": 1}'}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": count, "output_tokens": count},
    }
    assert wire.parse_reply(PRESETS["anthropic"], anthropic_reply) == wire.Reply('{"a": 1}', 0, 0)


def test_a_refusal_keeps_its_words_without_control_characters() -> None:
    refused = {
        "choices": [{"message": {"content": None, "refusal": "No\x00 way\x1b"}, "finish_reason": "stop"}]
    }
    assert wire.parse_reply(PRESETS["openai"], refused).refusal == "No  way "
