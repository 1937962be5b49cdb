"""The "model" behind ``ainode simulate-vision``: it answers only from what a request shows.

A real model sees the request and nothing else, so this one does the same (DESIGN.md §10):

* a ``json_schema`` ``response_format`` or a forced Anthropic tool: an instance of the schema the
  request carries, with the values the schema allows (``boundary``: its edges, the highest
  ``image_index``, a box of no area);
* ``json_object``: an instance of a JSON Schema written in the messages, if there is one;
  otherwise an answer in a shape of its own, as a real model without a schema would give;
* nothing structured: the same, as text.

It is as strict as the real APIs where a request can be wrong: OpenAI refuses a ``strict``
schema outside its subset and a ``json_object`` request whose messages never say "JSON";
Anthropic wants ``anthropic-version``, ``max_tokens`` and a key. Every text it writes says
SIMULATED. The written answer can come in fences or after prose, be padded past ``max_tokens``
(and then cut, as a real model's is), or be a refusal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

SIMULATED_MODEL = "ainode-simulated-vision"
Style = Literal["plain", "fenced", "prose"]
REFUSAL = "SIMULATED refusal: I can't help with reading these images."

# OpenAI Structured Outputs, "Supported schemas" (platform.openai.com/docs/guides/structured-outputs,
# read 2026-11): the keywords strict mode accepts; anything else is a 400.
STRICT_KEYWORDS = frozenset(
    {
        "type", "properties", "required", "additionalProperties", "items", "enum", "const", "anyOf",
        "description", "title", "$defs", "definitions", "$ref", "pattern", "format", "minimum",
        "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems",
        "patternProperties", "unevaluatedItems", "contains", "minContains", "maxContains", "uniqueItems",
    }
)  # fmt: skip
STRICT_MAX_DEPTH = 10
ANTHROPIC_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# Where the named box edges sit in the schema's coordinate range, so a region is visible.
BOX_PLACEMENT = {"x_min": 0.30, "y_min": 0.30, "x_max": 0.45, "y_max": 0.42}
MAX_ARRAY_ITEMS = 1000  # a schema asking for more (minItems 10**9) gets this many


class RequestRejected(Exception):
    """The request is one the real API refuses: ``status`` and the API's error ``kind``."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind


@dataclass(frozen=True)
class Answering:
    """How the simulated model writes its answer."""

    style: Style = "plain"
    boundary: bool = False  # the schema's edge values: highest index, box of no area, 1.0, 5
    findings: int = 1  # items in each array the schema asks for
    reply_tokens: int = 0  # pad the answer to about this many tokens (cut at max_tokens)


# -- schemas ---------------------------------------------------------------------------------


def _nodes(
    schema: Any, path: tuple[str, ...] = (), depth: int = 1
) -> Iterator[tuple[tuple[str, ...], int, Any]]:
    yield path, depth, schema
    if not isinstance(schema, dict):
        return
    for name, sub in (schema.get("properties") or {}).items():
        yield from _nodes(sub, (*path, "properties", name), depth + 1)
    if "items" in schema:
        yield from _nodes(schema["items"], (*path, "items"), depth + 1)
    for i, option in enumerate(schema.get("anyOf") or []):
        yield from _nodes(option, (*path, "anyOf", str(i)), depth)
    for name, sub in (schema.get("$defs") or {}).items():
        yield from _nodes(sub, (*path, "$defs", name), depth)


def check_strict_schema(name: str, schema: Any) -> None:
    """Refuse what OpenAI's strict mode refuses, with its kind of message."""
    prefix = f"Invalid schema for response_format '{name}'"
    if not isinstance(schema, dict) or schema.get("type") != "object" or "anyOf" in schema:
        raise RequestRejected(
            400, "invalid_request_error", f"{prefix}: the root must be an object, not anyOf."
        )
    for path, depth, node in _nodes(schema):
        where = f"In context=({', '.join(repr(p) for p in path)})"
        if not isinstance(node, dict):
            raise RequestRejected(
                400, "invalid_request_error", f"{prefix}: {where}, schema must be an object."
            )
        for keyword in node:
            if keyword not in STRICT_KEYWORDS:
                raise RequestRejected(
                    400, "invalid_request_error", f"{prefix}: {where}, '{keyword}' is not permitted."
                )
        if depth > STRICT_MAX_DEPTH:
            raise RequestRejected(
                400, "invalid_request_error", f"{prefix}: {where}, nesting deeper than {STRICT_MAX_DEPTH}."
            )
        if node.get("type") == "object" or "properties" in node:
            if node.get("additionalProperties") is not False:
                raise RequestRejected(
                    400,
                    "invalid_request_error",
                    f"{prefix}: {where}, 'additionalProperties' is required to be supplied and to be false.",
                )
            properties = set(node.get("properties") or {})
            required = set(node.get("required") or [])
            if properties != required:
                missing = sorted(properties - required)
                raise RequestRejected(
                    400,
                    "invalid_request_error",
                    f"{prefix}: {where}, 'required' is required to be supplied and to be an array "
                    f"including every key in properties. Missing {missing}.",
                )


def instance(schema: Any, answering: Answering, name: str = "") -> Any:
    """A value that ``schema`` accepts, written the way ``answering`` says."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            return None
        return values[-1] if answering.boundary else values[0]
    if "anyOf" in schema:
        options = [o for o in schema["anyOf"] if isinstance(o, dict) and o.get("type") != "null"]
        return instance(options[0], answering, name) if options else None
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        return {key: instance(sub, answering, key) for key, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        count = max(int(schema.get("minItems", 0)), answering.findings)
        count = min(count, int(schema.get("maxItems", count)), MAX_ARRAY_ITEMS)
        return [instance(schema.get("items", {}), answering, name) for _ in range(count)]
    if kind in ("integer", "number"):
        return _number(schema, answering, name, integer=kind == "integer")
    if kind == "boolean":
        return not answering.boundary
    if kind == "string":
        return f"SIMULATED {name or 'text'}: ainode simulate-vision, no model looked at these images"
    return None


def _number(schema: dict[str, Any], answering: Answering, name: str, integer: bool) -> int | float:
    low = schema.get("minimum", schema.get("exclusiveMinimum"))
    high = schema.get("maximum", schema.get("exclusiveMaximum"))
    if answering.boundary:
        value = high if high is not None else (low if low is not None else 0)
    elif low is not None and high is not None:
        value = low + BOX_PLACEMENT.get(name, 0.5) * (high - low)
        if name not in BOX_PLACEMENT and integer:
            value = low  # e.g. the first image, the lowest urgency
    else:
        value = low if low is not None else 1
    return round(value) if integer else float(value)


def schema_in_text(texts: list[str]) -> dict[str, Any] | None:
    """The largest JSON object written in ``texts`` that looks like an object schema."""
    decoder = json.JSONDecoder()
    found: list[tuple[int, dict[str, Any]]] = []
    for text in texts:
        for match in re.finditer(r"\{", text):
            try:
                value, end = decoder.raw_decode(text, match.start())
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict) and value.get("type") == "object" and "properties" in value:
                found.append((end - match.start(), value))
    return max(found, key=lambda item: item[0])[1] if found else None


def own_shape(images: int) -> dict[str, Any]:
    """What a model answers when asked for JSON with no schema: plausible, and not ours."""
    return {
        "impression": "SIMULATED: no model looked at these images",
        "observations": [
            {"finding": "SIMULATED rounded opacity", "location": "right upper lobe", "image": 1}
            for _ in range(min(images, 1))
        ],
        "confidence": "moderate",
    }


# -- writing the answer -------------------------------------------------------------------------


def write(value: Any, answering: Answering) -> str:
    """The answer as text, padded to ``reply_tokens`` and in the chosen style."""
    if answering.reply_tokens and isinstance(value, dict):
        key = next((k for k, v in value.items() if isinstance(v, str)), None)
        if key is not None:
            padding = " SIMULATED padding." * (answering.reply_tokens * 4 // 19 + 1)
            value = {**value, key: value[key] + padding}
    text = json.dumps(value, ensure_ascii=False)
    if answering.style == "fenced":
        return f"```json\n{text}\n```"
    if answering.style == "prose":
        return f"SIMULATED: here are the findings you asked for.\n{text}\nLet me know if you need more."
    return text


def tokens(text: str) -> int:
    return len(text) // 4 + 1


def cut(text: str, max_tokens: int) -> tuple[str, bool]:
    """``text`` as a model stopped at ``max_tokens`` would leave it, and whether it was cut."""
    return (text[: max_tokens * 4], True) if tokens(text) > max_tokens else (text, False)


# -- the two wire formats ------------------------------------------------------------------------


def _texts_openai(body: dict[str, Any]) -> tuple[list[str], int]:
    texts: list[str] = []
    images = 0
    for message in body["messages"]:
        content = message.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    texts.append(str(part.get("text", "")))
                elif part.get("type") == "image_url":
                    url = str(part.get("image_url", {}).get("url", ""))
                    if not re.match(r"^data:image/(jpeg|png|gif|webp);base64,", url):
                        raise RequestRejected(
                            400, "invalid_request_error", "image_url is not a base64 data URL."
                        )
                    images += 1
        elif content is not None:
            raise RequestRejected(400, "invalid_request_error", "message content must be a string or a list.")
    return texts, images


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def openai_answer(body: Any, answering: Answering) -> tuple[Any, int]:
    """The answer to a chat-completions request: (the value to write, images seen)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body.get("model"):
        raise RequestRejected(400, "invalid_request_error", "body is not a chat-completions request")
    try:
        texts, images = _texts_openai(body)
    except (AttributeError, TypeError) as exc:
        raise RequestRejected(400, "invalid_request_error", f"malformed messages: {exc}") from None
    for key in ("max_tokens", "max_completion_tokens"):
        if body.get(key) is not None and not _positive_int(body[key]):
            raise RequestRejected(
                400, "invalid_request_error", f"Invalid '{key}': expected an integer of at least 1."
            )
    response_format = body.get("response_format") or {}
    kind = response_format.get("type", "text")
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        name = str(spec.get("name", ""))
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise RequestRejected(
                400, "invalid_request_error", "json_schema.name must match ^[a-zA-Z0-9_-]{1,64}$"
            )
        if spec.get("strict"):
            check_strict_schema(name, spec.get("schema"))
        return instance(spec.get("schema"), answering), images
    if kind == "json_object":
        if not any("json" in text.lower() for text in texts):
            raise RequestRejected(
                400,
                "invalid_request_error",
                "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                "'json_object'.",
            )
    elif kind != "text":
        raise RequestRejected(400, "invalid_request_error", f"response_format type {kind!r} is not supported")
    schema = schema_in_text(texts)
    return (instance(schema, answering) if schema is not None else own_shape(images)), images


def anthropic_answer(body: Any, headers: dict[str, str], answering: Answering) -> tuple[Any, str | None, int]:
    """(the value to write, the tool name it answers through or None for text, images seen)."""
    if "anthropic-version" not in headers:
        raise RequestRejected(400, "invalid_request_error", "anthropic-version: header is required")
    if not isinstance(body, dict) or not body.get("model") or not isinstance(body.get("messages"), list):
        raise RequestRejected(400, "invalid_request_error", "model and messages are required")
    if not _positive_int(body.get("max_tokens")):
        raise RequestRejected(400, "invalid_request_error", "max_tokens: Field required")
    texts = [body["system"]] if isinstance(body.get("system"), str) else []
    images = 0
    expected = "user"
    for message in body["messages"]:
        if message.get("role") != expected:
            raise RequestRejected(400, "invalid_request_error", "messages: roles must alternate, user first")
        expected = "assistant" if expected == "user" else "user"
        content = message.get("content")
        blocks: list[Any] = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for block in blocks:
            if block.get("type") == "text":
                texts.append(str(block.get("text", "")))
            elif block.get("type") == "image":
                source: dict[str, Any] = block.get("source") or {}
                if source.get("type") != "base64" or source.get("media_type") not in ANTHROPIC_MEDIA_TYPES:
                    raise RequestRejected(400, "invalid_request_error", "image source: unsupported type")
                images += 1
    tools = {t.get("name"): t for t in body.get("tools") or []}
    for tool in tools.values():
        if (tool.get("input_schema") or {}).get("type") != "object":
            raise RequestRejected(400, "invalid_request_error", "tools: input_schema must be of type object")
    choice = body.get("tool_choice") or {}
    if choice.get("type") == "tool":
        if choice.get("name") not in tools:
            raise RequestRejected(
                400, "invalid_request_error", f"tool_choice names no tool: {choice.get('name')}"
            )
        return instance(tools[choice["name"]]["input_schema"], answering), str(choice["name"]), images
    schema = schema_in_text(texts)
    return (instance(schema, answering) if schema is not None else own_shape(images)), None, images
